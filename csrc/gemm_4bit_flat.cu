// 4-bit (nf4/fp4, optional double quant) matmul for M <= 8 on any K: out = x @ W.T + bias. It reads W as the flat
// packed array it is stored as, so rows may start mid-byte (K odd) and quantization blocks may straddle rows, the
// layouts the other small-M kernels refuse (they need K % 32 == 0), which otherwise take dequantize + cuBLAS.
// H200, 4097x1000, graph us (bench/RESULTS.md): 16-bit x 5.8 / 6.4 / 9.5 / 12.2 / 12.5 at M = 1 / 2 / 3 / 5 / 8,
// against 9.0-14.9 for dequantize + cuBLAS and 6.0-12.2 for fp16 cuBLAS; fp32 x 9.5-16.8 against 19.7-41.8.
//
// A row n is the elements n K .. n K + K - 1 of the flat array; they lie in the 32-element units (16 aligned bytes,
// inside one quantization block since the blocksize is a power of two >= 32) n K / 32 .. (n K + K - 1) / 32. S warps
// share a row (S chosen by the launcher so that the grid has enough warps: a warp per row gave 1000 rows of 4097
// columns 1000 warps for 132 SMs, 13.4 us at M = 1): lane l of the row's warp s takes units l + 32 (s + S r) of the
// run with one 128-bit load each (a lane's loads all issued before the first is used; a CTA's first loads before it
// stages x), multiplies the 32 codes of a unit by x in fp32 and scales the unit's sum by the block's absmax. The
// row's lanes meet by warp shuffles, then in shared memory.
//
// x is staged once per CTA, the MT (M padded to 1, 2, 4 or 8) tokens of a column side by side, so one 16- to 128-bit
// load brings a column for every token, with 32 zero columns on each side, so that the units crossing a row's ends
// need no masking (with a masked path for them, warps holding one ran both paths: a quarter of all instructions).
// The lanes of a warp read columns 32 apart, so each run of 32 columns is followed by a pad that puts those reads
// in distinct banks (without it a first version took 21 us at 4097x1000, M = 1). Products and sums are fp32 for
// every activation dtype (the reference rounds W to it first: within the tests' tolerance). Staging x in 128-bit
// pieces instead of elements measured no faster.
#include "common.cuh"
#include <type_traits>

namespace shardq {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxTokens = 8;
// 128-bit loads per lane and round: rows are split over warps until every lane has one or two units
constexpr int kUnits = 2;

// Staged x: column k's MT values (type S) at byte k * MT * sizeof(S) + (k / 32) * pad, pad = min(16, MT sizeof(S)):
// lanes reading columns 32 apart then hit distinct banks within each phase of their loads. S is fp32, except for
// 16-bit x with 4 or 8 tokens, which stays 16-bit (exact): half the shared memory, so two CTAs fit per SM, and half
// the shared-memory reads, which bounded 8 tokens (a 32-byte column per lane and element as fp32).
template <typename T, int MT>
using Staged = std::conditional_t<(MT >= 4 && sizeof(T) == 2), T, float>;
template <int MT, int kSize> __host__ __device__ constexpr int x_pad() { return MT * kSize < 16 ? MT * kSize : 16; }
template <int MT, int kSize> __host__ __device__ constexpr int x_chunk_bytes() {
  return 32 * MT * kSize + x_pad<MT, kSize>();
}
__host__ __device__ constexpr int tokens_padded(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8; }

// Columns -32 .. K + 31 are staged (zeros outside 0 .. K - 1), so a unit crossing the row's ends needs no masking.
constexpr int kZeroCols = 32;
__host__ __device__ constexpr int staged_chunks(int K) { return (K + 2 * kZeroCols + 31) / 32; }

template <typename S, int MT>
__device__ __forceinline__ int x_offset(int k) {
  const int c = k + kZeroCols;
  return c * MT * (int)sizeof(S) + (c >> 5) * x_pad<MT, sizeof(S)>();
}

// Column k of every token, from the staged x, as fp32.
template <typename S, int MT>
__device__ __forceinline__ void load_col(const uint8_t* xs, int k, float (&v)[MT]) {
  const uint8_t* c = xs + x_offset<S, MT>(k);
  if constexpr (sizeof(S) == 2) {  // MT = 4 (one 64-bit load) or 8 (one 128-bit load)
    using V = std::conditional_t<MT == 4, uint2, uint4>;
    const V a = *reinterpret_cast<const V*>(c);
    const S* e = reinterpret_cast<const S*>(&a);
#pragma unroll
    for (int m = 0; m < MT; ++m) v[m] = to_f32(e[m]);
  } else if constexpr (MT == 1) {
    v[0] = *reinterpret_cast<const float*>(c);
  } else if constexpr (MT == 2) {
    const float2 a = *reinterpret_cast<const float2*>(c);
    v[0] = a.x, v[1] = a.y;
  } else {
#pragma unroll
    for (int h = 0; h < MT / 4; ++h) {
      const float4 a = reinterpret_cast<const float4*>(c)[h];
      v[4 * h] = a.x, v[4 * h + 1] = a.y, v[4 * h + 2] = a.z, v[4 * h + 3] = a.w;
    }
  }
}

// x [M, K] into the staged layout, tokens M .. MT - 1 and the columns around 0 .. K - 1 zero.
template <typename T, int MT>
__device__ __forceinline__ void stage_x(const Gemm4Args& p, uint8_t* xs) {
  using S = Staged<T, MT>;
#pragma unroll 4
  for (int k = (int)threadIdx.x - kZeroCols; k < p.K + kZeroCols; k += kThreads) {
    S v[MT];
    const bool in = k >= 0 && k < p.K;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const T e = in && m < p.M ? static_cast<const T*>(p.x)[(int64_t)m * p.K + k] : T(0.f);
      if constexpr (sizeof(S) == sizeof(T)) {
        v[m] = e;
      } else {
        v[m] = to_f32(e);
      }
    }
    S* c = reinterpret_cast<S*>(xs + x_offset<S, MT>(k));
#pragma unroll
    for (int m = 0; m < MT; ++m) c[m] = v[m];
  }
}

// Sum over the unit's elements of code[nibble] * x[column] per token, columns k0 .. k0 + 31 (those outside the
// row meet staged zeros; element 2 b is the high nibble of byte b).
template <typename S, int MT>
__device__ __forceinline__ void unit_dot(const uint4& v, int k0, const float* code, const uint8_t* xs,
                                         float (&part)[MT]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w = i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float c = code[(w >> (8 * (j >> 1) + 4 * (1 - (j & 1)))) & 15];
      float xv[MT];
      load_col<S, MT>(xs, k0 + 8 * i + j, xv);
#pragma unroll
      for (int m = 0; m < MT; ++m) part[m] = fmaf(c, xv[m], part[m]);
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

// One round of a lane's units: units ub + stride j (j < U) up to u1, loaded with their block scales.
template <int U>
struct Round {
  uint4 v[U];
  float s[U];
  __device__ __forceinline__ void load(const Gemm4Args& p, int64_t ub, int64_t u1, int64_t stride, int64_t bytes) {
#pragma unroll
    for (int r = 0; r < U; ++r) {
      const int64_t u = ub + stride * r;
      v[r] = u <= u1 ? load_unit(p.w, u, bytes) : make_uint4(0, 0, 0, 0);
      s[r] = u <= u1 ? p.am.get((u << 5) >> p.bs_shift) : 0.f;
    }
  }
};

// Row n's unit range.
__device__ __forceinline__ void row_units(const Gemm4Args& p, int n, int64_t& e0, int64_t& u0, int64_t& u1) {
  e0 = (int64_t)n * p.K;
  u0 = e0 >> 5;
  u1 = (e0 + p.K - 1) >> 5;
}

// Rows n0 + r (r < kWarps / S) of the CTA's round: warp w works on row n0 + w / S as its part w % S; the partial
// sums meet in red (kWarps x MT floats) and threads below rows x M add them up and store.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 2) gemm4_flat(Gemm4Args p, int S) {
  constexpr int U = kUnits;
  __shared__ float code[16];
  __shared__ float red[2][kWarps * MT];
  extern __shared__ __align__(16) uint8_t xs[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, R = kWarps / S, part_i = warp % S;
  const int64_t bytes = ((int64_t)p.N * p.K + 1) / 2, stride = 32 * S, step = stride * U;
  int n0 = blockIdx.x * R;
  int64_t e0, u0, u1;
  Round<U> rd;
  bool loaded = false;
  if (n0 + warp / S < p.N) {  // the first round's loads fly while x is staged
    row_units(p, n0 + warp / S, e0, u0, u1);
    rd.load(p, u0 + lane + 32 * part_i, u1, stride, bytes);
    loaded = true;
  }
  if (threadIdx.x < 16) code[threadIdx.x] = __ldg(p.code + threadIdx.x);
  stage_x<T, MT>(p, xs);
  __syncthreads();
  for (int buf = 0; n0 < p.N; n0 += gridDim.x * R, buf ^= 1) {
    const int n = n0 + warp / S;
    float acc[MT] = {};
    if (n < p.N) {
      row_units(p, n, e0, u0, u1);
      for (int64_t ub = u0 + lane + 32 * part_i; ub - lane - 32 * part_i <= u1; ub += step) {
        if (!loaded) rd.load(p, ub, u1, stride, bytes);
        loaded = false;
#pragma unroll
        for (int r = 0; r < U; ++r) {
          const int64_t u = ub + stride * r;
          if (u > u1) break;
          float part[MT] = {};
          unit_dot<Staged<T, MT>, MT>(rd.v[r], (int)((u << 5) - e0), code, xs, part);
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[m] = fmaf(part[m], rd.s[r], acc[m]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float t = acc[m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (lane == 0) red[buf][warp * MT + m] = t;
    }
    __syncthreads();  // red[buf] is rewritten two rounds later, after the next round's barrier
    if (threadIdx.x < R * p.M) {
      const int r = threadIdx.x / p.M, m = threadIdx.x % p.M, nn = n0 + r;
      if (nn < p.N) {
        float t = 0.f;
        for (int s = 0; s < S; ++s) t += red[buf][(r * S + s) * MT + m];
        if (p.bias) t += to_f32(static_cast<const T*>(p.bias)[nn]);
        static_cast<T*>(p.out)[(int64_t)m * p.N + nn] = from_f32<T>(t);
      }
    }
  }
}

constexpr int kStaticSmem = 16 * 4 + 2 * kWarps * kMaxTokens * 4;

inline size_t flat_smem(int M, int K, bool x16) {
  const int mt = tokens_padded(M), chunks = staged_chunks(K);
  const int chunk = mt == 1   ? x_chunk_bytes<1, 4>()
                    : mt == 2 ? x_chunk_bytes<2, 4>()
                    : mt == 4 ? (x16 ? x_chunk_bytes<4, 2>() : x_chunk_bytes<4, 4>())
                              : (x16 ? x_chunk_bytes<8, 2>() : x_chunk_bytes<8, 4>());
  return (size_t)chunks * chunk;
}

// Warps per row: doubled while the grid still runs in one wave of resident CTAs and every lane of the row still
// gets a unit (each CTA stages x, so more CTAs than fit at once cost a second round of staging).
inline int warps_per_row(int N, int K, int resident) {
  const int64_t units = (K + 31) / 32 + 1;
  int S = 1;
  while (2 * S <= kWarps && (N + kWarps / (2 * S) - 1) / (kWarps / (2 * S)) <= resident && 64LL * S <= units) S *= 2;
  return S;
}

template <typename T, int MT>
cudaError_t launch_flat(const Gemm4Args& p, size_t smem, int optin, cudaStream_t stream) {
  static bool allowed[64] = {};
  cudaError_t err = allow_smem(gemm4_flat<T, MT>, (size_t)(optin - kStaticSmem), allowed);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemm4_flat<T, MT>, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorNotSupported;
  const int res = per_sm * sm_count(), S = warps_per_row(p.N, p.K, res), R = kWarps / S;
  const int want = (p.N + R - 1) / R;
  gemm4_flat<T, MT><<<want < res ? want : res, kThreads, smem, stream>>>(p, S);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_flat(const Gemm4Args& p, size_t smem, int optin, cudaStream_t stream) {
  switch (tokens_padded(p.M)) {
    case 1: return launch_flat<T, 1>(p, smem, optin, stream);
    case 2: return launch_flat<T, 2>(p, smem, optin, stream);
    case 4: return launch_flat<T, 4>(p, smem, optin, stream);
    default: return launch_flat<T, 8>(p, smem, optin, stream);
  }
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_gemm_4bit_gemv. Returns cudaErrorNotSupported, launching nothing, unless: dtype fp16, bf16
// or fp32, 1 <= M <= 8, K >= 1, blocksize a power of two >= 32, w 16-byte aligned, an absmax given, and the staged x
// (ceil((K + 64) / 32) runs of 32 columns x MT tokens, fp32 or 16-bit from 4 tokens, + pad) fitting in shared
// memory.
SHARDQ_API int shardq_gemm_4bit_flat(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                     const float* nested_absmax, const float* nested_code, float offset,
                                     const float* code, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                     int64_t blocksize, int dtype, void* stream_ptr) {
  const Gemm4Args a = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, M, N,
                                    K, blocksize);
  const bool shape_ok = (dtype == kF16 || dtype == kBF16 || dtype == kF32) && M >= 1 && M <= kMaxTokens && N >= 1 &&
                        N <= INT32_MAX && K >= 1 && K <= (1 << 20) && a.bs_shift >= 5 && (uintptr_t)w % 16 == 0 &&
                        a.am.given();
  if (!shape_ok) return cudaErrorNotSupported;
  int dev = 0, optin = 0;
  const cudaError_t err = smem_optin(dev, optin);
  if (err != cudaSuccess) return err;
  const size_t smem = flat_smem((int)M, (int)K, dtype != kF32);
  if (smem + kStaticSmem > (size_t)optin) return cudaErrorNotSupported;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (dtype == kF32) return dispatch_flat<float>(a, smem, optin, stream);
  SHARDQ_DISPATCH_16(dtype, T, return dispatch_flat<T>(a, smem, optin, stream));
  return cudaErrorNotSupported;
}
