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
  // From a launcher's scale arguments: the fp32 absmax, or double quant (8-bit codes, nested absmax, nested code,
  // offset).
  static Absmax of(const float* absmax, const void* absmax_q, const float* nested_absmax, const float* nested_code,
                   float offset) {
    return {absmax, static_cast<const uint8_t*>(absmax_q), nested_absmax, nested_code, offset};
  }
  // Whether the arguments name a whole scale: the fp32 absmax, or every part of double quant.
  bool given() const {
    return plain != nullptr || (q != nullptr && nested_absmax != nullptr && nested_code != nullptr);
  }
  __device__ __forceinline__ float get(int64_t blk) const {
    if (plain) return __ldg(plain + blk);
    return __ldg(nested_code + __ldg(q + blk)) * __ldg(nested_absmax + (blk >> 8)) + offset;
  }
};

// Absmax of a block loaded ahead of use and decoded later (the tensor-core kernels): the plain value, or for
// double quant its 8-bit code and the nested absmax, decoded with the nested code table staged in shared memory.
struct AbsRaw {
  float v;
  uint32_t q;
};

// Raw absmax of the block holding flattened element e (zeros when !ok).
__device__ __forceinline__ AbsRaw fetch_abs(const Absmax& am, int bs_shift, bool ok, int64_t e) {
  AbsRaw r{0.f, 0u};
  if (ok) {
    const int64_t blk = e >> bs_shift;
    if (am.plain) {
      r.v = __ldg(am.plain + blk);
    } else {
      r.q = __ldg(am.q + blk);
      r.v = __ldg(am.nested_absmax + (blk >> 8));
    }
  }
  return r;
}

__device__ __forceinline__ float decode_abs(const Absmax& am, const float* ncode, AbsRaw r) {
  return am.plain ? r.v : ncode[r.q] * r.v + am.offset;
}

// Nibble of flattened element e: the first element of each byte is in the high nibble.
__device__ __forceinline__ int nibble_at(const uint8_t* packed, int64_t e) {
  uint8_t b = __ldg(packed + (e >> 1));
  return (e & 1) ? (b & 0xF) : (b >> 4);
}

// Pairs of 16-bit values in one register, and the m16n8k16 tensor-core mma with fp32 accumulation (sm_80+).
template <typename T> struct Half2Of;
template <> struct Half2Of<__half> { using type = __half2; };
template <> struct Half2Of<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T> __device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T> __device__ __forceinline__ uint32_t scale_pair(uint32_t v, uint32_t s) {
  using H2 = typename Half2Of<T>::type;
  H2 r = __hmul2(*reinterpret_cast<H2*>(&v), *reinterpret_cast<H2*>(&s));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Lane-private pair table of the tensor-core 4-bit kernels: word [byte][lane] holds the byte's two code values as
// a 16-bit pair (first element = high nibble = low half), so a lookup is one shift/LOP3 and one conflict-free LDS.
constexpr int kPairTableWords = 256 * 32;

template <typename T, int kThreads> __device__ __forceinline__ void fill_pair_table(uint32_t* table, const float* code) {
  for (int i = threadIdx.x; i < kPairTableWords; i += kThreads)
    table[i] = pack_pair<T>(__ldg(code + (i >> 9)), __ldg(code + ((i >> 5) & 15)));
}

// Pair of byte q (0..3) of word wd. lane4 (= lane * 4) must be opaque to the compiler (an asm mov), so that
// (shifted & 0x7F80) | lane4 stays a single LOP3.
__device__ __forceinline__ uint32_t pair_lookup(const uint32_t* table, uint32_t lane4, uint32_t wd, int q) {
  const uint32_t sh = q == 0 ? wd << 7 : wd >> (8 * q - 7);
  return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(table) + ((sh & 0x7F80u) | lane4));
}

template <typename T> __device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// cp.async (sm_80+): 16-byte global -> shared copies that hold no registers while in flight.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// LLM.int8() helpers: round(v * 127 / absmax) with the factor formed as the reference forms it (torch evaluates 127 / t as
// t.reciprocal() * 127), so ties round identically.
__device__ __forceinline__ float quant127_factor(float absmax) {
  return absmax > 0.f ? __frcp_rn(absmax) * 127.f : 0.f;
}
// quant127 with the row's factor formed once (quant127_factor): the same value.
__device__ __forceinline__ int8_t quant127_by(float v, float factor) {
  if (factor == 0.f) return 0;
  return (int8_t)fminf(fmaxf(rintf(v * factor), -127.f), 127.f);
}
__device__ __forceinline__ int8_t quant127(float v, float absmax) { return quant127_by(v, quant127_factor(absmax)); }

// Sum of the 16 int8 products of a and b, added to acc.
__device__ __forceinline__ int dot16(const int4& a, const int4& b, int acc) {
  acc = __dp4a(a.x, b.x, acc);
  acc = __dp4a(a.y, b.y, acc);
  acc = __dp4a(a.z, b.z, acc);
  return __dp4a(a.w, b.w, acc);
}

// Multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return 132;
  if (!cache[dev]) cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMultiProcessorCount, dev);
  return cache[dev] > 0 ? cache[dev] : 132;
}

// The current device and the shared memory a block may opt in to there (queried once per device).
inline cudaError_t smem_optin(int& dev, int& optin) {
  static int cache[64] = {0};
  const cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  if (!cache[dev]) cudaDeviceGetAttribute(&cache[dev], cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  optin = cache[dev];
  return cudaSuccess;
}

// Lets `kernel` use `bytes` of dynamic shared memory on the current device. The attribute belongs to a function
// on a device, so it is set once per device: `done` is the caller's flag array for that kernel.
template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes, bool (&done)[64]) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  if (done[dev]) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (err == cudaSuccess) {
    done[dev] = true;
  } else {
    cudaGetLastError();  // reported here, once: not again by the next launcher that checks for launch errors
  }
  return err;
}

inline int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1))) return -1;
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

// The operands of a 4-bit matmul, out[M, N] = x[M, K] @ W[N, K].T + bias, as every 4-bit kernel takes them (kernels
// needing more derive from it). bs_shift: log2(blocksize), -1 if blocksize is not a power of two.
struct Gemm4Args {
  const void* x;
  const uint8_t* w;
  Absmax am;
  const float* code;
  const void* bias;
  void* out;
  int M, N, K, bs_shift;
  // From a launcher's C arguments; M, N and K are narrowed to int, so launchers check them before launching.
  static Gemm4Args of(const void* x, const void* w, const float* absmax, const void* absmax_q,
                      const float* nested_absmax, const float* nested_code, float offset, const float* code,
                      const void* bias, void* out, int64_t M, int64_t N, int64_t K, int64_t blocksize) {
    return {x, static_cast<const uint8_t*>(w), Absmax::of(absmax, absmax_q, nested_absmax, nested_code, offset),
            code, bias, out, (int)M, (int)N, (int)K, log2_exact(blocksize)};
  }
};

// Output tile (m0, n0) of CTA blockIdx.x over mtiles x ntiles tiles of BM tokens x BN features, in bands of 8
// token tiles; inside a band the token tile varies fastest, so the CTAs that run together read each weight tile
// from DRAM once and share a band of x in L2.
__device__ __forceinline__ void band_tile(int mtiles, int ntiles, int BM, int BN, int& m0, int& n0) {
  constexpr int kBand = 8;
  const int l = blockIdx.x, per_band = kBand * ntiles, band = l / per_band, rem = l - band * per_band;
  const int rows = min(kBand, mtiles - band * kBand);
  m0 = (band * kBand + rem % rows) * BM;
  n0 = (rem / rows) * BN;
}

inline unsigned grid_1d(int64_t n, int threads, int64_t cap = 1 << 20) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  return (unsigned)(g < cap ? g : cap);
}

namespace {  // one copy per translation unit: a kernel template's host stub is not shared across the library

// K split over CTAs: out = the parts' fp32 sums ws[part, M, N] added in part order (deterministic), + bias.
template <typename T>
__global__ void sum_parts(const float* __restrict__ ws, int parts, const T* __restrict__ bias, T* __restrict__ out,
                          int M, int N) {
  const int64_t total = (int64_t)M * N;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    float v = bias ? to_f32(bias[i % N]) : 0.f;
    for (int q = 0; q < parts; ++q) v += ws[q * total + i];
    out[i] = from_f32<T>(v);
  }
}

template <typename T>
cudaError_t launch_sum_parts(const float* ws, int parts, const void* bias, void* out, int M, int N,
                             cudaStream_t stream) {
  sum_parts<T><<<grid_1d((int64_t)M * N, 256, 4 * sm_count()), 256, 0, stream>>>(
      ws, parts, static_cast<const T*>(bias), static_cast<T*>(out), M, N);
  return cudaGetLastError();
}

}  // namespace

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
