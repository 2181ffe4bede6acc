// Blockwise 4-bit dequantization: flattened elements [e0, e0 + count) of a packed nf4/fp4 tensor into a dense
// fp16/bf16/fp32 buffer. Used by the dequantize_4bit op (loading, export) and by gemm_4bit for large M, where
// row chunks of the weight are dequantized into scratch and multiplied by cuBLAS.
// Fast path: 8 elements per thread from one coalesced 32-bit load into one 16-byte store (e0 a multiple of 8,
// power-of-two blocksize >= 8, word-aligned packed bytes, 16-byte aligned output); the last count % 8 elements,
// and every element where the fast path does not apply, one per thread with per-element nibble and block addressing.
#include "common.cuh"

namespace shardq {
namespace {

// Eight T values from fp32 as one 16-byte store (two for fp32).
template <typename T>
__device__ __forceinline__ void store8(T* dst, const float* v);
template <>
__device__ __forceinline__ void store8<__half>(__half* dst, const float* v) {
  uint4 o;
  uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    ow[i] = *reinterpret_cast<uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(dst) = o;
}
template <>
__device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* dst, const float* v) {
  uint4 o;
  uint32_t* ow = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    ow[i] = *reinterpret_cast<uint32_t*>(&h);
  }
  *reinterpret_cast<uint4*>(dst) = o;
}
template <>
__device__ __forceinline__ void store8<float>(float* dst, const float* v) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Each thread turns 4 packed bytes (8 elements) into one vector store; consecutive lanes take consecutive
// words, so loads and stores are fully coalesced. kUnroll words per thread are loaded before any is used.
constexpr int kUnroll = 4;

template <typename T>
__global__ void __launch_bounds__(256) dequant4_fast(const uint8_t* __restrict__ w, Absmax am,
                                                     const float* __restrict__ code, T* __restrict__ out,
                                                     int64_t e0, int64_t nwords, int bs_shift) {
  __shared__ float cs[16];
  if (threadIdx.x < 16) cs[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(w + e0 / 2);
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t base = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; base < nwords; base += stride * kUnroll) {
    uint32_t v[kUnroll];
    float s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + u * stride;
      v[u] = c < nwords ? __ldcs(wp + c) : 0u;
      s[u] = c < nwords ? am.get((e0 + c * 8) >> bs_shift) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + u * stride;
      if (c >= nwords) break;
      float f[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (v[u] >> (8 * b)) & 0xFF;
        f[2 * b] = cs[byte >> 4] * s[u];
        f[2 * b + 1] = cs[byte & 15] * s[u];
      }
      store8<T>(out + c * 8, f);
    }
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
  const Absmax am = Absmax::of(absmax, absmax_q, nested_absmax, nested_code, offset);
  const uint8_t* wp = static_cast<const uint8_t*>(w);
  const int shift = log2_exact(blocksize);
  // Whole 8-element words through the fast kernel, the last count % 8 elements through the generic one.
  const bool fast = e0 % 8 == 0 && count >= 8 && shift >= 3 && (uintptr_t)out % 16 == 0 &&
                    ((uintptr_t)wp + e0 / 2) % 4 == 0;
  const int64_t nwords = fast ? count / 8 : 0, done = nwords * 8;
  SHARDQ_DISPATCH_ALL(dtype, T, {
    T* o = static_cast<T*>(out);
    if (nwords > 0)
      dequant4_fast<T><<<grid_1d(nwords, 256 * kUnroll), 256, 0, stream>>>(wp, am, code, o, e0, nwords, shift);
    if (done < count)
      dequant4_generic<T><<<grid_1d(count - done, 256), 256, 0, stream>>>(wp, am, code, o + done, e0 + done,
                                                                          count - done, blocksize);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}
