// 4-bit (nf4/fp4, optional double quant) matmul for M <= 8 on any K: out = x @ W.T + bias. It reads W as the flat
// packed array it is stored as, so rows may start mid-byte (K odd) and quantization blocks may straddle rows, the
// layouts the other small-M kernels refuse (they need K % 32 == 0), which otherwise take dequantize + cuBLAS.
// Measured on an H200 at 4097x1000 (bench/RESULTS.md): with fp32 x 17.5 / 21.8 us at M = 1 / 2 against 19.6 / 28.9
// for dequantize-to-fp32 + cuBLAS, so the op routes fp32 x with M <= 2 here; with fp16 x 13.4 us against 9.1 for
// dequantize + cuBLAS (fp16 cuBLAS: 6.1), so 16-bit x does not come here. What holds it back: one warp per row
// gives 1000 warps for 132 SMs, too few to hide each lane's serial chain of per-element lookups.
//
// A warp owns one output row n at a time (rows strided over all warps of the grid): the elements n K .. n K + K - 1
// of the flat array, which lie in the 32-element units (16 aligned bytes, inside one quantization block since the
// blocksize is a power of two >= 32) from n K / 32 to (n K + K - 1) / 32. Lane l takes units l, l + 32, ... of that
// run with one 128-bit load each (all of its units issued before the first is used), multiplies the 32 codes of a
// unit by x (staged once per CTA in shared memory as fp32, the unit's columns k = 32 u - n K + j, masked to the row)
// in fp32, and scales the unit's sum by the block's absmax. The lanes of a warp read x columns 32 apart, so x is
// staged with one pad float per 32 columns (no bank conflicts: without it the kernel took 21 us at 4097x1000,
// M = 1). Lane sums meet by warp shuffles; products and sums are fp32 for every activation dtype (the reference
// rounds W to it first: within the tests' tolerance).
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
// 128-bit loads in flight per lane: a row of up to 8192 columns in one round (4096 for 8 tokens, within registers)
template <int MT> __host__ __device__ constexpr int units_per_lane() { return MT <= 4 ? 8 : 4; }

// Staged x: column k of a token at k + k / 32 (one pad float per 32), so that the lanes of a warp, which read
// columns 32 apart, hit distinct banks; tokens xpitch(K) floats apart.
__device__ __forceinline__ int xpos(int k) { return k + (k >> 5); }
__host__ __device__ inline int xpitch(int K) { return K + K / 32 + 1; }

// Sum over the unit's elements inside the row of code[nibble] * x[m][column], per token.
template <int MT>
__device__ __forceinline__ void unit_dot(const uint4& v, int k0, int K, const float* code, const float* xs, int M,
                                         float (&part)[MT]) {
  const int pitch = xpitch(K);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // byte j / 2, high nibble first
      const int k = k0 + 8 * i + j;
      if (k < 0 || k >= K) continue;
      const float c = code[(w >> (8 * (j >> 1) + 4 * (1 - (j & 1)))) & 15];
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) part[m] = fmaf(c, xs[m * pitch + xpos(k)], part[m]);
    }
  }
}

// Unit u of the packed array (bytes long): one 128-bit load, or byte by byte for a last unit cut short.
__device__ __forceinline__ uint4 load_unit(const uint8_t* w, int64_t u, int64_t bytes) {
  if ((u + 1) * 16 <= bytes) return __ldg(reinterpret_cast<const uint4*>(w) + u);
  uint32_t word[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (u * 16 + i < bytes) word[i >> 2] |= (uint32_t)__ldg(w + u * 16 + i) << (8 * (i & 3));
  return make_uint4(word[0], word[1], word[2], word[3]);
}

template <typename T, int MT>
__global__ void __launch_bounds__(kThreads) gemm4_flat(Gemm4Args p) {
  extern __shared__ __align__(16) float smem[];
  float* code = smem;
  float* xs = smem + 16;
  for (int i = threadIdx.x; i < p.M * p.K; i += kThreads)
    xs[i / p.K * xpitch(p.K) + xpos(i % p.K)] = to_f32(static_cast<const T*>(p.x)[i]);
  if (threadIdx.x < 16) code[threadIdx.x] = __ldg(p.code + threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t bytes = ((int64_t)p.N * p.K + 1) / 2;
  for (int n = blockIdx.x * kWarps + (threadIdx.x >> 5); n < p.N; n += gridDim.x * kWarps) {
    const int64_t e0 = (int64_t)n * p.K, u0 = e0 >> 5, u1 = (e0 + p.K - 1) >> 5;
    float acc[MT] = {};
    constexpr int kUnitsPerLane = units_per_lane<MT>();
    for (int64_t ub = u0; ub <= u1; ub += 32 * kUnitsPerLane) {
      uint4 v[kUnitsPerLane];
      float s[kUnitsPerLane];
#pragma unroll
      for (int r = 0; r < kUnitsPerLane; ++r) {
        const int64_t u = ub + lane + 32 * r;
        v[r] = u <= u1 ? load_unit(p.w, u, bytes) : make_uint4(0, 0, 0, 0);
        s[r] = u <= u1 ? p.am.get((u << 5) >> p.bs_shift) : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kUnitsPerLane; ++r) {
        const int64_t u = ub + lane + 32 * r;
        if (u > u1) break;
        float part[MT] = {};
        unit_dot<MT>(v[r], (int)((u << 5) - e0), p.K, code, xs, p.M, part);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = fmaf(part[m], s[r], acc[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float t = acc[m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (lane == 0 && m < p.M) {
        if (p.bias) t += to_f32(static_cast<const T*>(p.bias)[n]);
        static_cast<T*>(p.out)[(int64_t)m * p.N + n] = from_f32<T>(t);
      }
    }
  }
}

template <typename T, int MT>
cudaError_t launch_flat(const Gemm4Args& p, size_t smem, int optin, cudaStream_t stream) {
  static bool allowed[64] = {};
  cudaError_t err = allow_smem(gemm4_flat<T, MT>, (size_t)optin, allowed);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemm4_flat<T, MT>, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorNotSupported;
  const int want = (p.N + kWarps - 1) / kWarps, res = per_sm * sm_count();
  gemm4_flat<T, MT><<<want < res ? want : res, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_flat(const Gemm4Args& p, size_t smem, int optin, cudaStream_t stream) {
  if (p.M == 1) return launch_flat<T, 1>(p, smem, optin, stream);
  if (p.M == 2) return launch_flat<T, 2>(p, smem, optin, stream);
  if (p.M <= 4) return launch_flat<T, 4>(p, smem, optin, stream);
  return launch_flat<T, 8>(p, smem, optin, stream);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_gemm_4bit_gemv. Returns cudaErrorNotSupported, launching nothing, unless: dtype fp16, bf16
// or fp32, 1 <= M <= 8, K >= 1, blocksize a power of two >= 32, w 16-byte aligned, an absmax given, and x (M * K
// fp32) fitting in shared memory.
SHARDQ_API int shardq_gemm_4bit_flat(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                     const float* nested_absmax, const float* nested_code, float offset,
                                     const float* code, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                     int64_t blocksize, int dtype, void* stream_ptr) {
  const Gemm4Args a = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, M, N,
                                    K, blocksize);
  const bool shape_ok = (dtype == kF16 || dtype == kBF16 || dtype == kF32) && M >= 1 && M <= 8 && N >= 1 &&
                        N <= INT32_MAX && K >= 1 && K <= (1 << 20) && a.bs_shift >= 5 && (uintptr_t)w % 16 == 0 &&
                        a.am.given();
  if (!shape_ok) return cudaErrorNotSupported;
  int dev = 0, optin = 0;
  const cudaError_t err = smem_optin(dev, optin);
  if (err != cudaSuccess) return err;
  const size_t smem = 64 + (size_t)M * xpitch((int)K) * 4;
  if (smem > (size_t)optin) return cudaErrorNotSupported;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (dtype == kF32) return dispatch_flat<float>(a, smem, optin, stream);
  SHARDQ_DISPATCH_16(dtype, T, return dispatch_flat<T>(a, smem, optin, stream));
  return cudaErrorNotSupported;
}
