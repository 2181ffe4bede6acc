// Blockwise 4-bit dequantization: flattened elements [e0, e0 + count) of a packed nf4/fp4 tensor into a dense
// fp16/bf16/fp32 buffer. Used by the dequantize_4bit op (loading, export) and by gemm_4bit for large M, where
// row chunks of the weight are dequantized into scratch and multiplied by cuBLAS.
// Fast path: 32 elements per thread from one 128-bit load (e0, count multiples of 32, power-of-two blocksize
// >= 32, aligned pointers); generic path: one element per thread with per-element nibble and block addressing.
#include "common.cuh"

namespace shardq {
namespace {

template <typename T>
__device__ __forceinline__ void store32(T* dst, const float* v) {
#pragma unroll
  for (int i = 0; i < 32; ++i) dst[i] = from_f32<T>(v[i]);
}
template <>
__device__ __forceinline__ void store32<__half>(__half* dst, const float* v) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint4 o;
    uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h = __floats2half2_rn(v[8 * q + 2 * i], v[8 * q + 2 * i + 1]);
      ow[i] = *reinterpret_cast<uint32_t*>(&h);
    }
    reinterpret_cast<uint4*>(dst)[q] = o;
  }
}
template <>
__device__ __forceinline__ void store32<__nv_bfloat16>(__nv_bfloat16* dst, const float* v) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint4 o;
    uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __nv_bfloat162 h = __floats2bfloat162_rn(v[8 * q + 2 * i], v[8 * q + 2 * i + 1]);
      ow[i] = *reinterpret_cast<uint32_t*>(&h);
    }
    reinterpret_cast<uint4*>(dst)[q] = o;
  }
}
template <>
__device__ __forceinline__ void store32<float>(float* dst, const float* v) {
#pragma unroll
  for (int q = 0; q < 8; ++q) reinterpret_cast<float4*>(dst)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
}

template <typename T>
__global__ void dequant4_fast(const uint8_t* __restrict__ w, Absmax am, const float* __restrict__ code,
                              T* __restrict__ out, int64_t e0, int64_t nchunks, int bs_shift) {
  __shared__ float cs[16];
  if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < nchunks; c += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = e0 + c * 32;
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(w + (e >> 1)));
    const float s = am.get(e >> bs_shift);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    float f[32];
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const uint32_t byte = (words[b >> 2] >> ((b & 3) * 8)) & 0xFF;
      f[2 * b] = cs[byte >> 4] * s;
      f[2 * b + 1] = cs[byte & 15] * s;
    }
    store32<T>(out + c * 32, f);
  }
}

template <typename T>
__global__ void dequant4_generic(const uint8_t* __restrict__ w, Absmax am, const float* __restrict__ code,
                                 T* __restrict__ out, int64_t e0, int64_t count, int64_t blocksize) {
  __shared__ float cs[16];
  if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e = e0 + i;
    out[i] = from_f32<T>(cs[nibble_at(w, e)] * am.get(e / blocksize));
  }
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// out[0:count] = dequantized flattened elements [e0, e0 + count). Double quant as in shardq_gemm_4bit_small.
SHARDQ_API int shardq_dequantize_4bit(const void* w, const float* absmax, const void* absmax_q,
                                      const float* nested_absmax, const float* nested_code, float offset,
                                      const float* code, void* out, int64_t e0, int64_t count, int64_t blocksize,
                                      int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (count <= 0) return cudaSuccess;
  if (e0 < 0 || blocksize <= 0) return cudaErrorInvalidValue;
  const Absmax am{absmax, static_cast<const uint8_t*>(absmax_q), nested_absmax, nested_code, offset};
  const uint8_t* wp = static_cast<const uint8_t*>(w);
  const int shift = log2_exact(blocksize);
  const bool fast = e0 % 32 == 0 && count % 32 == 0 && shift >= 5 && (uintptr_t)out % 16 == 0 &&
                    ((uintptr_t)wp + e0 / 2) % 16 == 0;
  SHARDQ_DISPATCH_ALL(dtype, T, {
    if (fast) {
      const int64_t nchunks = count / 32;
      dequant4_fast<T><<<grid_1d(nchunks, 256), 256, 0, stream>>>(wp, am, code, static_cast<T*>(out), e0, nchunks, shift);
    } else {
      dequant4_generic<T><<<grid_1d(count, 256), 256, 0, stream>>>(wp, am, code, static_cast<T*>(out), e0, count, blocksize);
    }
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}
