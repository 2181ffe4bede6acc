// LLM.int8() activation side and weight quantization.
//  - shardq_quantize_int8_rowwise: q = round(a * 127 / absmax_row), scale = absmax_row (the SCB format).
//  - shardq_int8_prepare: for int8_linear, finds outlier columns (max |x| over rows > threshold) as a sorted
//    device-side list with its count (no host sync, so CUDA graphs can capture it), and quantizes each row of x
//    over the non-outlier columns (outlier columns get q = 0; they are multiplied in floating point later).
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kRowThreads = 256;

__device__ __forceinline__ float block_max(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float m = 0.f;
  for (int i = 0; i < (int)(blockDim.x >> 5); ++i) m = fmaxf(m, sh[i]);
  return m;
}

// One CTA per row. colmax (may be null) marks outlier columns with colmax[k] > threshold.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) rowquant(const T* __restrict__ a, int8_t* __restrict__ q,
                                                        float* __restrict__ scale, const float* __restrict__ colmax,
                                                        float threshold, int64_t rows, int64_t cols) {
  __shared__ float sh[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* ar = a + r * cols;
    float m = 0.f;
    for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
      const bool outlier = colmax && colmax[k] > threshold;
      if (!outlier) m = fmaxf(m, fabsf(to_f32(ar[k])));
    }
    m = block_max(m, sh);
    for (int64_t k = threadIdx.x; k < cols; k += blockDim.x) {
      const bool outlier = colmax && colmax[k] > threshold;
      q[r * cols + k] = outlier ? (int8_t)0 : quant127(to_f32(ar[k]), m);
    }
    if (threadIdx.x == 0) scale[r] = m;
  }
}

// colmax[k] = max over rows of |x[m, k]| (colmax zeroed beforehand; non-negative floats order as ints).
template <typename T>
__global__ void column_absmax(const T* __restrict__ x, float* __restrict__ colmax, int64_t M, int64_t K) {
  const int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (k >= K) return;
  float m = 0.f;
  for (int64_t r = blockIdx.y; r < M; r += gridDim.y) m = fmaxf(m, fabsf(to_f32(x[r * K + k])));
  atomicMax(reinterpret_cast<int*>(colmax + k), __float_as_int(m));
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

}  // namespace
}  // namespace shardq

using namespace shardq;

SHARDQ_API int shardq_quantize_int8_rowwise(const void* a, void* q, float* scale, int64_t rows, int64_t cols,
                                            int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  SHARDQ_DISPATCH_ALL(dtype, T, {
    rowquant<T><<<grid_1d(rows, 1, 65535), kRowThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<int8_t*>(q),
                                                                     scale, nullptr, 0.f, rows, cols);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}

// Activation side of int8_linear. Scratch: colmax float[K], list int[K], count int[1]; outputs q int8[M,K],
// row_absmax float[M]. threshold <= 0 disables outliers (count = 0).
SHARDQ_API int shardq_int8_prepare(const void* x, void* q, float* row_absmax, float* colmax, int* list, int* count,
                                   int64_t M, int64_t K, float threshold, int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (M <= 0 || K <= 0) return cudaErrorInvalidValue;
  if (M <= kSmallPrepRows && K <= 65536) {
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
      const int64_t ry = M < 64 ? M : 64;
      column_absmax<T><<<dim3(grid_1d(K, 256), (unsigned)ry), 256, 0, stream>>>(xt, colmax, M, K);
      outlier_list<<<1, 1024, 0, stream>>>(colmax, threshold, K, list, count);
    }
    rowquant<T><<<grid_1d(M, 1, 65535), kRowThreads, 0, stream>>>(xt, static_cast<int8_t*>(q), row_absmax,
                                                                  outliers ? colmax : nullptr, threshold, M, K);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}
