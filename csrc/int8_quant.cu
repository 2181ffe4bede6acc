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

// Activation side for small batches (M <= kPrepRows, no compacted copy) in two launches (the multi-launch path below
// costs four graph nodes; one CTA doing everything took ~20 us at K = 8192). The scan runs up to kPrepCtas CTAs,
// each a chunk of 128 * V columns, one column per thread and step, all rows.
//   prep_scan: column maxima -> outlier bits (mask), each chunk's outlier count and per-row maxima over its
//              non-outlier columns;
//   prep_finish: every CTA reduces the chunks' row maxima; CTA c writes chunk c's outliers into the sorted list at
//              the offset the earlier chunks' counts give; all CTAs quantize x, ~4 elements per thread (with the
//              quantization spread over the chunks' few CTAs only, it took 20 us at M = 32, K = 11008).
// Scratch (the colmax argument, float[K + kPrepStats]): mask words, then per-chunk counts, then per-chunk maxima.
constexpr int kPrepRows = 32;
constexpr int kPrepCtas = 64;
constexpr int kPrepStats = kPrepCtas + kPrepCtas * kPrepRows;
static_assert(kPrepStats == 2112, "cuda_ops.INT8_PREP_STATS and the sizes documented below");

struct PrepGeom {
  int M, K, V, chunks;  // V: columns per thread (chunks of 128 * V columns)
  uint32_t* mask;       // [ceil(K / 32)]
  int* counts;          // [chunks]
  float* maxima;        // [chunks, M]
  static PrepGeom of(float* scratch, int M, int K) {
    const int V = (K + 128 * kPrepCtas - 1) / (128 * kPrepCtas), width = 128 * V;
    int* counts = reinterpret_cast<int*>(scratch) + K;
    return {M, K, V, (K + width - 1) / width, reinterpret_cast<uint32_t*>(scratch), counts,
            reinterpret_cast<float*>(counts + kPrepCtas)};
  }
};

template <typename T>
__global__ void __launch_bounds__(128) prep_scan(const T* __restrict__ x, float threshold, PrepGeom g) {
  __shared__ float red[4][kPrepRows];
  __shared__ int cnt[4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float rm[kPrepRows];
#pragma unroll
  for (int m = 0; m < kPrepRows; ++m) rm[m] = 0.f;
  int outliers = 0;
  for (int j = 0; j < g.V; ++j) {
    const int k = (blockIdx.x * g.V + j) * 128 + threadIdx.x;
    float v[kPrepRows];
    float cm = 0.f;
#pragma unroll
    for (int m = 0; m < kPrepRows; ++m) {
      v[m] = m < g.M && k < g.K ? fabsf(to_f32(x[(int64_t)m * g.K + k])) : 0.f;
      cm = fmaxf(cm, v[m]);
    }
    const bool outlier = threshold > 0.f && cm > threshold;
    const uint32_t bits = __ballot_sync(0xffffffffu, outlier);
    if (lane == 0 && k < g.K) g.mask[k >> 5] = bits;
    outliers += __popc(bits);
#pragma unroll
    for (int m = 0; m < kPrepRows; ++m) rm[m] = outlier ? rm[m] : fmaxf(rm[m], v[m]);
  }
#pragma unroll
  for (int m = 0; m < kPrepRows; ++m) {  // all rows (zeros past M): no branch between the independent reductions
    float v = rm[m];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[warp][m] = v;
  }
  if (lane == 0) cnt[warp] = outliers;
  __syncthreads();
  if (threadIdx.x < g.M)
    g.maxima[blockIdx.x * g.M + threadIdx.x] =
        fmaxf(fmaxf(red[0][threadIdx.x], red[1][threadIdx.x]), fmaxf(red[2][threadIdx.x], red[3][threadIdx.x]));
  if (threadIdx.x == 0) g.counts[blockIdx.x] = cnt[0] + cnt[1] + cnt[2] + cnt[3];
}

// Warp 0 of chunk c: the chunk's outlier columns, in order, at list[before ...].
__device__ __forceinline__ void chunk_outliers(const PrepGeom& g, int before, int* __restrict__ list) {
  const int lane = threadIdx.x & 31, w0 = blockIdx.x * g.V * 4, words = min(g.V * 4, (g.K + 31) / 32 - w0);
  for (int i = 0; i < words; i += 32) {
    uint32_t bits = i + lane < words ? g.mask[w0 + i + lane] : 0u;
    int pos = __popc(bits);
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, pos, o);
      if (lane >= o) pos += up;
    }
    const int total = __shfl_sync(0xffffffffu, pos, 31);
    pos += before - __popc(bits);
    for (; bits; bits &= bits - 1) list[pos++] = (w0 + i + lane) * 32 + __ffs(bits) - 1;
    before += total;
  }
}

// Row maxima over all chunks into rmax (as ints: non-negative floats order as ints), every load issued before the
// first shared-memory atomic.
__device__ __forceinline__ void reduce_maxima(const PrepGeom& g, int* rmax) {
  constexpr int kLoads = kPrepCtas * kPrepRows / 128;
  float mx[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int i = threadIdx.x + u * 128;
    mx[u] = i < g.chunks * g.M ? g.maxima[i] : 0.f;
  }
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int i = threadIdx.x + u * 128;
    if (i < g.chunks * g.M) atomicMax(&rmax[i % g.M], __float_as_int(mx[u]));
  }
}

// Warp 0: outliers of the chunks before this CTA's (c < blockIdx.x) and of all chunks.
__device__ __forceinline__ int2 outliers_before(const PrepGeom& g) {
  const int lane = threadIdx.x & 31;
  int b = 0, all = 0;
#pragma unroll
  for (int c = lane; c < kPrepCtas; c += 32) {
    const int n = c < g.chunks ? g.counts[c] : 0;
    all += n;
    b += c < (int)blockIdx.x ? n : 0;
  }
  for (int o = 16; o > 0; o >>= 1) {
    b += __shfl_xor_sync(0xffffffffu, b, o);
    all += __shfl_xor_sync(0xffffffffu, all, o);
  }
  return make_int2(b, all);
}

// Quantization unit u of prep_finish: 4 consecutive columns of one row (k0 % 4 == 0: they share a mask word).
template <typename T>
struct PrepUnit {
  float v[4];
  uint32_t bits;
  int m;
  int64_t i;  // element index of column k0 in x and q
  int k0;
  __device__ __forceinline__ void load(const T* __restrict__ x, const PrepGeom& g, int64_t u, int k4) {
    m = (int)(u / k4);
    k0 = (int)(u % k4) * 4;
    i = (int64_t)m * g.K + k0;
    bits = g.mask[k0 >> 5] >> (k0 & 31);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = k0 + j < g.K ? to_f32(x[i + j]) : 0.f;
  }
  __device__ __forceinline__ void store(int8_t* __restrict__ q, const PrepGeom& g, const float* factor) const {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (k0 + j < g.K) q[i + j] = (bits >> j) & 1u ? (int8_t)0 : quant127_by(v[j], factor[m]);
  }
};

// At least one CTA per chunk (CTA c < chunks lists chunk c's outliers); all CTAs quantize x in units of 4 consecutive
// columns of one row, grid-strided, with each row's factor formed once. A thread's first unit is loaded before the
// reductions, so that its latency overlaps theirs; the list comes last.
template <typename T>
__global__ void __launch_bounds__(128) prep_finish(const T* __restrict__ x, int8_t* __restrict__ q,
                                                   float* __restrict__ row_absmax, int* __restrict__ list,
                                                   int* __restrict__ count, PrepGeom g) {
  __shared__ int rmax[kPrepRows];
  __shared__ float factor[kPrepRows];
  const int k4 = (g.K + 3) / 4;
  const int64_t units = (int64_t)g.M * k4, first = blockIdx.x * 128 + threadIdx.x, stride = gridDim.x * 128;
  PrepUnit<T> unit;
  if (first < units) unit.load(x, g, first, k4);
  if (threadIdx.x < kPrepRows) rmax[threadIdx.x] = 0;
  __syncthreads();
  reduce_maxima(g, rmax);
  __syncthreads();
  if (threadIdx.x < g.M) factor[threadIdx.x] = quant127_factor(__int_as_float(rmax[threadIdx.x]));
  if (blockIdx.x == 0 && threadIdx.x < g.M) row_absmax[threadIdx.x] = __int_as_float(rmax[threadIdx.x]);
  __syncthreads();
  for (int64_t u = first; u < units; u += stride) {
    if (u != first) unit.load(x, g, u, k4);
    unit.store(q, g, factor);
  }
  if (threadIdx.x < 32 && (int)blockIdx.x < g.chunks) {  // last: nothing here waits for it
    const int2 b = outliers_before(g);
    if (blockIdx.x == 0 && threadIdx.x == 0) *count = b.y;
    chunk_outliers(g, b.x, list);
  }
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

// Activation side of int8_linear. Scratch: colmax float[K + 2112] (K + kPrepStats), list int[K], count int[1];
// outputs q int8[M,K], row_absmax float[M] and, if xo is not null, xo[M, xo_cap] (x's dtype): the first
// min(count, xo_cap) outlier columns of x, compacted for the large-M epilogue. threshold <= 0 disables outliers
// (count = 0).
SHARDQ_API int shardq_int8_prepare(const void* x, void* q, float* row_absmax, float* colmax, int* list, int* count,
                                   void* xo, int64_t xo_cap, int64_t M, int64_t K, float threshold, int dtype,
                                   void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (M <= 0 || K <= 0 || xo_cap < 0 || xo_cap > INT32_MAX) return cudaErrorInvalidValue;
  // Small batches: the two launches of prep_scan / prep_finish, except without outliers past 8 rows, where zeroing
  // the count + the row quantization below measured faster (H200, graph: 4.4-6.1 vs 6.9-10.4 us at M = 16, 32).
  if (M <= kPrepRows && K <= INT32_MAX / kPrepRows && xo == nullptr && (threshold > 0.f || M <= 8)) {
    const PrepGeom g = PrepGeom::of(colmax, (int)M, (int)K);
    SHARDQ_DISPATCH_ALL(dtype, T, {
      prep_scan<T><<<g.chunks, 128, 0, stream>>>(static_cast<const T*>(x), threshold, g);
      const int64_t units = (M * ((K + 3) / 4) + 127) / 128;  // 4 columns per thread, ~1 unit each
      const int grid = (int)std::max<int64_t>(g.chunks, std::min<int64_t>(units, 8 * sm_count()));
      prep_finish<T><<<grid, 128, 0, stream>>>(static_cast<const T*>(x), static_cast<int8_t*>(q), row_absmax, list,
                                               count, g);
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
