// Shared helpers for shardq's CUDA kernels: element types, conversions, 4-bit format access.
// Every launcher is a plain extern "C" function taking raw pointers, sizes and a cudaStream_t and
// returning a cudaError_t (0 = success), so the library needs no torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define SHARDQ_API extern "C" __attribute__((visibility("default")))

namespace shardq {

// dtype codes shared with shardq/kernels/lib.py
enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }

// Real absmax of 4-bit block `blk`: plain fp32, or double-quant codes decoded inline
// (nested_code[absmax_q[blk]] * nested_absmax[blk / 256] + offset).
struct Absmax {
  const float* plain;
  const uint8_t* q;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  __device__ __forceinline__ float get(int64_t blk) const {
    if (plain) return __ldg(plain + blk);
    return __ldg(nested_code + __ldg(q + blk)) * __ldg(nested_absmax + (blk >> 8)) + offset;
  }
};

// Nibble of flattened element e: the first element of each byte is in the high nibble.
__device__ __forceinline__ int nibble_at(const uint8_t* packed, int64_t e) {
  uint8_t b = __ldg(packed + (e >> 1));
  return (e & 1) ? (b & 0xF) : (b >> 4);
}

inline int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1))) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

inline unsigned grid_1d(int64_t n, int threads, int64_t cap = 1 << 20) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  return (unsigned)(g < cap ? g : cap);
}

}  // namespace shardq

#define SHARDQ_DISPATCH_16(dtype, T, ...)              \
  do {                                                  \
    if ((dtype) == shardq::kF16) {                      \
      using T = __half;                                 \
      __VA_ARGS__;                                      \
    } else if ((dtype) == shardq::kBF16) {              \
      using T = __nv_bfloat16;                          \
      __VA_ARGS__;                                      \
    } else {                                            \
      return cudaErrorInvalidValue;                     \
    }                                                   \
  } while (0)

#define SHARDQ_DISPATCH_ALL(dtype, T, ...)             \
  do {                                                  \
    if ((dtype) == shardq::kF16) {                      \
      using T = __half;                                 \
      __VA_ARGS__;                                      \
    } else if ((dtype) == shardq::kBF16) {              \
      using T = __nv_bfloat16;                          \
      __VA_ARGS__;                                      \
    } else if ((dtype) == shardq::kF32) {               \
      using T = float;                                  \
      __VA_ARGS__;                                      \
    } else {                                            \
      return cudaErrorInvalidValue;                     \
    }                                                   \
  } while (0)
