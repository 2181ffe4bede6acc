// LLM.int8() activation side and weight quantization.
//  - shardq_quantize_int8_rowwise: q = round(a * 127 / absmax_row), scale = absmax_row (the SCB format).
//  - shardq_int8_prepare: for int8_linear, finds outlier columns (max |x| over rows > threshold) as a sorted
//    device-side list with its count (no host sync, so CUDA graphs can capture it), and quantizes each row of x
//    over the non-outlier columns (outlier columns get q = 0; they are multiplied in floating point later).
#include <algorithm>

#include "common.cuh"

namespace shardq {
namespace {

// V consecutive elements starting at p as floats: V = 8 is one 16-byte load for 16-bit T (two for float; p
// aligned to 8 elements), V = 1 a plain load.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float* v) {
  if constexpr (V == 1) {
    v[0] = to_f32(*p);
  } else if constexpr (sizeof(T) == 2) {
    static_assert(V == 8, "16-bit rows load 8 elements at a time");
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f32(h[i]);
  } else {
    static_assert(V == 8, "float rows load 8 elements at a time");
    const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
}

// Which of columns k .. k+V-1 are outliers (colmax null: none).
template <int V>
__device__ __forceinline__ void outlier_flags(const float* __restrict__ colmax, float threshold, int64_t k, bool* o) {
  float c[V];
  if (colmax == nullptr) {
#pragma unroll
    for (int i = 0; i < V; ++i) c[i] = 0.f;
  } else if constexpr (V == 1) {
    c[0] = colmax[k];
  } else {
    load_vec<float, V>(colmax + k, c);
  }
#pragma unroll
  for (int i = 0; i < V; ++i) o[i] = colmax != nullptr && c[i] > threshold;
}

template <int V>
__device__ __forceinline__ void store_q(int8_t* __restrict__ q, const int8_t* v) {
  if constexpr (V == 1) {
    *q = v[0];
  } else {
    static_assert(V == 8, "8 quantized bytes per store");
    *reinterpret_cast<int2*>(q) = *reinterpret_cast<const int2*>(v);
  }
}

// Compact copy of the outlier columns of x for the large-M epilogue: xo[r, j] = x[r, list[j]], j < min(count, cap).
template <typename T>
struct OutlierCopy {
  T* xo;  // [rows, cap] or null
  int cap;
  const int* list;
  const int* count;
};

// A row per group of G warps (G = 1, 2, 4 or 8: 8 / G rows per CTA; more warps per row when there are few rows),
// V columns per lane and step (V = 8: 16-byte loads, 8-byte stores): the max over the row's non-outlier columns,
// then a second read (from L1/L2) to quantize. colmax (may be null) marks outlier columns with colmax[k] >
// threshold: they get q = 0 and, with oc.xo, a copy in xo.
template <typename T, int V>
__global__ void __launch_bounds__(256) rowquant(const T* __restrict__ a, int8_t* __restrict__ q,
                                                float* __restrict__ scale, const float* __restrict__ colmax,
                                                float threshold, int64_t rows, int64_t cols, int group_warps,
                                                OutlierCopy<T> oc) {
  __shared__ float red[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, first = warp / group_warps * group_warps;
  const int t = (warp - first) * 32 + lane, nt = group_warps * 32;  // thread within the row's group
  const int64_t r = blockIdx.x * (int64_t)(8 / group_warps) + warp / group_warps;
  const bool live = r < rows;
  const T* ar = a + r * cols;
  float m = 0.f;
#pragma unroll 4
  for (int64_t k = t * V; live && k < cols; k += nt * V) {
    float v[V];
    bool o[V];
    load_vec<T, V>(ar + k, v);
    outlier_flags<V>(colmax, threshold, k, o);
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (!o[i]) m = fmaxf(m, fabsf(v[i]));
  }
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (lane == 0) red[warp] = m;
  __syncthreads();
  for (int w = first; w < first + group_warps; ++w) m = fmaxf(m, red[w]);
  if (!live) return;
#pragma unroll 4
  for (int64_t k = t * V; k < cols; k += nt * V) {
    float v[V];
    bool o[V];
    alignas(8) int8_t qv[V];
    load_vec<T, V>(ar + k, v);
    outlier_flags<V>(colmax, threshold, k, o);
#pragma unroll
    for (int i = 0; i < V; ++i) qv[i] = o[i] ? (int8_t)0 : quant127(v[i], m);
    store_q<V>(q + r * cols + k, qv);
  }
  if (t == 0) scale[r] = m;
  if (oc.xo != nullptr) {
    const int n = min(*oc.count, oc.cap);
    for (int j = t; j < n; j += nt) oc.xo[r * oc.cap + j] = ar[oc.list[j]];
  }
}

// colmax[k] = max over rows of |x[m, k]| (colmax zeroed beforehand; non-negative floats order as ints). A CTA
// covers 32*V columns (V per lane) over a strided subset of rows, one row per warp at a time, reduces its 8 warps
// in shared memory and does one atomic per column.
template <typename T, int V>
__global__ void __launch_bounds__(256) column_absmax(const T* __restrict__ x, float* __restrict__ colmax, int64_t M,
                                                     int64_t K) {
  __shared__ float red[8][V][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t k = (blockIdx.x * 32 + (int64_t)lane) * V;
  float m[V];
#pragma unroll
  for (int i = 0; i < V; ++i) m[i] = 0.f;
  if (k < K) {
#pragma unroll 4
    for (int64_t r = blockIdx.y * 8 + (int64_t)warp; r < M; r += gridDim.y * 8) {
      float v[V];
      load_vec<T, V>(x + r * K + k, v);
#pragma unroll
      for (int i = 0; i < V; ++i) m[i] = fmaxf(m[i], fabsf(v[i]));
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) red[warp][i][lane] = m[i];
  __syncthreads();
  if (warp == 0 && k < K) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float c = red[0][i][lane];
      for (int w = 1; w < 8; ++w) c = fmaxf(c, red[w][i][lane]);
      atomicMax(reinterpret_cast<int*>(colmax + k + i), __float_as_int(c));
    }
  }
}

// One CTA of 1024 threads: sorted list of the columns with colmax > threshold, and their count.
__global__ void __launch_bounds__(1024) outlier_list(const float* __restrict__ colmax, float threshold, int64_t K,
                                                     int* __restrict__ list, int* __restrict__ count) {
  __shared__ int scan[1024];
  const int tid = threadIdx.x;
  const int64_t chunk = (K + 1023) / 1024, start = tid * chunk;
  const int64_t end = start + chunk < K ? start + chunk : K;
  int c = 0;
  for (int64_t k = start; k < end; ++k) c += colmax[k] > threshold;
  scan[tid] = c;
  __syncthreads();
  for (int o = 1; o < 1024; o <<= 1) {
    const int v = tid >= o ? scan[tid - o] : 0;
    __syncthreads();
    scan[tid] += v;
    __syncthreads();
  }
  int pos = scan[tid] - c;
  for (int64_t k = start; k < end; ++k)
    if (colmax[k] > threshold) list[pos++] = (int)k;
  if (tid == 1023) *count = scan[1023];
}

// Whole activation side in one CTA for small batches (M <= kSmallPrepRows, K <= 65536): column maxima,
// sorted outlier list, per-row absmax over the other columns and quantization, saving four launches.
constexpr int kSmallPrepRows = 8;

template <typename T>
__global__ void __launch_bounds__(1024) prep_small(const T* __restrict__ x, int8_t* __restrict__ q,
                                                   float* __restrict__ row_absmax, int* __restrict__ list,
                                                   int* __restrict__ count, int M, int K, float threshold) {
  __shared__ uint32_t flags[2048];
  __shared__ int scan[1024];
  __shared__ int rmax[kSmallPrepRows];
  const int tid = threadIdx.x, lane = tid & 31;
  for (int i = tid; i < 2048; i += 1024) flags[i] = 0u;
  if (tid < kSmallPrepRows) rmax[tid] = 0;
  __syncthreads();
  const int chunk = (K + 1023) / 1024, start = tid * chunk, end = min(start + chunk, K);
  float rm[kSmallPrepRows];
#pragma unroll
  for (int m = 0; m < kSmallPrepRows; ++m) rm[m] = 0.f;
  int c = 0;
  for (int k = start; k < end; ++k) {
    float v[kSmallPrepRows];
    float cm = 0.f;
#pragma unroll
    for (int m = 0; m < kSmallPrepRows; ++m) {
      v[m] = m < M ? fabsf(to_f32(x[(int64_t)m * K + k])) : 0.f;
      cm = fmaxf(cm, v[m]);
    }
    if (threshold > 0.f && cm > threshold) {
      ++c;
      atomicOr(&flags[k >> 5], 1u << (k & 31));
    } else {
#pragma unroll
      for (int m = 0; m < kSmallPrepRows; ++m) rm[m] = fmaxf(rm[m], v[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < kSmallPrepRows; ++m) {
    float v = rm[m];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0 && m < M) atomicMax(&rmax[m], __float_as_int(v));
  }
  scan[tid] = c;
  __syncthreads();
  for (int o = 1; o < 1024; o <<= 1) {
    const int add = tid >= o ? scan[tid - o] : 0;
    __syncthreads();
    scan[tid] += add;
    __syncthreads();
  }
  int pos = scan[tid] - c;
  for (int k = start; k < end; ++k)
    if ((flags[k >> 5] >> (k & 31)) & 1u) list[pos++] = k;
  if (tid == 1023) *count = scan[1023];
  for (int64_t idx = tid; idx < (int64_t)M * K; idx += 1024) {
    const int m = (int)(idx / K), k = (int)(idx - (int64_t)m * K);
    const bool outlier = (flags[k >> 5] >> (k & 31)) & 1u;
    q[idx] = outlier ? (int8_t)0 : quant127(to_f32(x[idx]), __int_as_float(rmax[m]));
  }
  if (tid < M) row_absmax[tid] = __int_as_float(rmax[tid]);
}

// 8 columns per thread where rows are whole 16-byte vectors (cols % 8 == 0, aligned pointers).
inline bool rows_vectorizable(const void* a, const void* q, int64_t cols) {
  return cols % 8 == 0 && (uintptr_t)a % 16 == 0 && (uintptr_t)q % 8 == 0;
}

// Warps per row: the fewest (a power of two up to 8) that give ~32 warps per SM (H200, M = 4096, K = 4096 or 8192:
// 1, 2, 4 or 8 warps per row all measured within 10 %; few rows need more warps each to fill the GPU).
template <typename T>
void launch_rowquant(const T* a, int8_t* q, float* scale, const float* colmax, float threshold, int64_t rows,
                     int64_t cols, OutlierCopy<T> oc, cudaStream_t stream) {
  int g = 1;
  while (g < 8 && rows * g < 32 * (int64_t)sm_count()) g *= 2;
  const unsigned grid = (unsigned)((rows + 8 / g - 1) / (8 / g));
  if (rows_vectorizable(a, q, cols))
    rowquant<T, 8><<<grid, 256, 0, stream>>>(a, q, scale, colmax, threshold, rows, cols, g, oc);
  else
    rowquant<T, 1><<<grid, 256, 0, stream>>>(a, q, scale, colmax, threshold, rows, cols, g, oc);
}

// Column maxima with ~8 CTAs per SM: each CTA 32*V columns and a share of the rows.
template <typename T, int V>
void launch_column_absmax(const T* x, float* colmax, int64_t M, int64_t K, cudaStream_t stream) {
  const int64_t cols = (K + 32 * V - 1) / (32 * V);
  const int64_t ry = std::min<int64_t>(std::max<int64_t>(1, (8 * sm_count() + cols - 1) / cols), (M + 7) / 8);
  column_absmax<T, V><<<dim3((unsigned)cols, (unsigned)std::min<int64_t>(ry, 65535)), 256, 0, stream>>>(x, colmax,
                                                                                                       M, K);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

SHARDQ_API int shardq_quantize_int8_rowwise(const void* a, void* q, float* scale, int64_t rows, int64_t cols,
                                            int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  SHARDQ_DISPATCH_ALL(dtype, T, {
    launch_rowquant<T>(static_cast<const T*>(a), static_cast<int8_t*>(q), scale, nullptr, 0.f, rows, cols,
                       OutlierCopy<T>{nullptr, 0, nullptr, nullptr}, stream);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}

// Activation side of int8_linear. Scratch: colmax float[K], list int[K], count int[1]; outputs q int8[M,K],
// row_absmax float[M] and, if xo is not null, xo[M, xo_cap] (x's dtype): the first min(count, xo_cap) outlier
// columns of x, compacted for the large-M epilogue. threshold <= 0 disables outliers (count = 0).
SHARDQ_API int shardq_int8_prepare(const void* x, void* q, float* row_absmax, float* colmax, int* list, int* count,
                                   void* xo, int64_t xo_cap, int64_t M, int64_t K, float threshold, int dtype,
                                   void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (M <= 0 || K <= 0 || xo_cap < 0 || xo_cap > INT32_MAX) return cudaErrorInvalidValue;
  if (M <= kSmallPrepRows && K <= 65536 && xo == nullptr) {
    SHARDQ_DISPATCH_ALL(dtype, T, {
      prep_small<T><<<1, 1024, 0, stream>>>(static_cast<const T*>(x), static_cast<int8_t*>(q), row_absmax, list,
                                            count, (int)M, (int)K, threshold);
      return cudaGetLastError();
    });
  }
  const bool outliers = threshold > 0.f;
  cudaError_t err;
  if (outliers) {
    err = cudaMemsetAsync(colmax, 0, K * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  } else {
    err = cudaMemsetAsync(count, 0, sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  SHARDQ_DISPATCH_ALL(dtype, T, {
    const T* xt = static_cast<const T*>(x);
    if (outliers) {
      if (rows_vectorizable(x, q, K))
        launch_column_absmax<T, 8>(xt, colmax, M, K, stream);
      else
        launch_column_absmax<T, 1>(xt, colmax, M, K, stream);
      outlier_list<<<1, 1024, 0, stream>>>(colmax, threshold, K, list, count);
    }
    const OutlierCopy<T> oc{outliers ? static_cast<T*>(xo) : nullptr, (int)xo_cap, list, count};
    launch_rowquant<T>(xt, static_cast<int8_t*>(q), row_absmax, outliers ? colmax : nullptr, threshold, M, K, oc,
                       stream);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}
