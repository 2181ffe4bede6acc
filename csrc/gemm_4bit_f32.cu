// 4-bit (nf4/fp4, optional double quant) matmul with fp32 activations for M <= 8: out = x @ W.T + bias, in fp32.
//
// fp32 is bitsandbytes' default compute dtype (a BitsAndBytesConfig without bnb_4bit_compute_dtype), and the
// reference dequantizes W to fp32 for it. The tensor-core kernels would round W and x to 16 bits, so this one
// stays on the CUDA cores: every weight is code[nibble] * absmax in fp32 (the reference's value) and every product
// an fp32 FMA. Without it fp32 took dequantize-to-fp32 + cuBLAS: 4 bytes written and 4 read per weight, against
// half a byte here.
//
// Work split: a warp owns kRows rows at a time (row groups strided over all warps of the grid) and walks their
// whole K in segments of 1024 columns. A lane loads 16 packed bytes of each row per segment (32 columns: one
// quantization block, blocksize >= 32) with the block's absmax, the next segment's loads in flight while it
// computes. x (M rows, whole K) is staged once per CTA in shared memory as fp32, its 16-byte units swizzled so
// that the lanes' 128-bit reads never conflict; the 16 code values sit in 16 banks, so lookups never conflict
// either. Lane sums meet by warp shuffles.
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 4;     // rows per warp and row group
constexpr int kSeg = 1024;   // columns per segment: 32 per lane

struct F32Args : Gemm4Args {
  int groups;  // row groups: ceil(N / kRows)
};

// x unit u (4 floats) of a row sits at u ^ (u / 8 % 8): lane l reads units 8l + q, so the 8 lanes of a
// quarter-warp hit 8 distinct 16-byte bank groups.
__device__ __forceinline__ int x_unit(int u) { return u ^ ((u >> 3) & 7); }

// One segment of a row group: each row's 16 packed bytes at this lane's 32 columns, and their block's absmax.
struct Seg {
  uint4 w[kRows];
  float s[kRows];
};

__device__ __forceinline__ void load_seg(const F32Args& p, int n0, int col, Seg& d) {
  const bool ok = col < p.K;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t n = min(n0 + r, p.N - 1);
    d.w[r] = ok ? __ldg(reinterpret_cast<const uint4*>(p.w + n * (p.K / 2) + col / 2)) : make_uint4(0, 0, 0, 0);
    d.s[r] = ok ? p.am.get((n * p.K + col) >> p.bs_shift) : 0.f;
  }
}

// Quad q (4 columns) of word w: element 2b is the high nibble of byte b.
__device__ __forceinline__ void dequant_quad(uint32_t w, int q, const float* code, float s, float (&v)[4]) {
  const uint32_t b = w >> (16 * (q & 1));
  v[0] = code[(b >> 4) & 15] * s;
  v[1] = code[b & 15] * s;
  v[2] = code[(b >> 12) & 15] * s;
  v[3] = code[(b >> 8) & 15] * s;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One segment: per quad, the kRows rows' 4 weights, then for every token one 128-bit x read and 4 FMAs per row.
template <int MT>
__device__ __forceinline__ void multiply(const Seg& d, bool ok, const float* code, const float4* xs, int xunits,
                                         int M, float (&acc)[kRows][MT]) {
  if (!ok) return;  // past K in the last segment: no x there
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    float v[kRows][4];
#pragma unroll
    for (int r = 0; r < kRows; ++r) dequant_quad(word_of(d.w[r], q >> 1), q, code, d.s[r], v[r]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        const float4 xv = xs[m * xunits + (q ^ (threadIdx.x & 7))];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          acc[r][m] = fmaf(v[r][0], xv.x, acc[r][m]);
          acc[r][m] = fmaf(v[r][1], xv.y, acc[r][m]);
          acc[r][m] = fmaf(v[r][2], xv.z, acc[r][m]);
          acc[r][m] = fmaf(v[r][3], xv.w, acc[r][m]);
        }
      }
    }
  }
}

// Warp sums of acc; lane 0 adds the bias and stores.
template <int MT>
__device__ __forceinline__ void store(const F32Args& p, int n0, float (&acc)[kRows][MT]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      const int n = n0 + r;
      if ((threadIdx.x & 31) == 0 && m < p.M && n < p.N)
        static_cast<float*>(p.out)[(int64_t)m * p.N + n] = v + (p.bias ? static_cast<const float*>(p.bias)[n] : 0.f);
      acc[r][m] = 0.f;
    }
}

template <int MT>
__global__ void __launch_bounds__(kThreads, 2) gemm4_f32(F32Args p) {
  // Dynamic shared memory only, so that it may take the whole opt-in size: the 16 code values, then x.
  extern __shared__ __align__(16) float4 smem[];
  float* code = reinterpret_cast<float*>(smem);
  float4* xs = smem + 4;
  const int xunits = p.K / 4;
  for (int i = threadIdx.x; i < p.M * xunits; i += kThreads) {
    const int m = i / xunits, u = i % xunits;
    xs[m * xunits + x_unit(u)] = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(p.x)) + i);
  }
  if (threadIdx.x < 16) code[threadIdx.x] = __ldg(p.code + threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31, segs = (p.K + kSeg - 1) / kSeg;
  const float4* xl = xs + 8 * lane;  // this lane's 8 units of segment 0
  float acc[kRows][MT] = {};
  Seg buf[2];
  for (int grp = blockIdx.x * kWarps + (threadIdx.x >> 5); grp < p.groups; grp += gridDim.x * kWarps) {
    const int n0 = grp * kRows;
    load_seg(p, n0, lane * 32, buf[0]);
    for (int s = 0; s < segs; s += 2) {  // two named buffers: the next segment loads while this one computes
      if (s + 1 < segs) load_seg(p, n0, (s + 1) * kSeg + lane * 32, buf[1]);
      multiply<MT>(buf[0], s * kSeg + lane * 32 < p.K, code, xl + s * (kSeg / 4), xunits, p.M, acc);
      if (s + 1 < segs) {
        if (s + 2 < segs) load_seg(p, n0, (s + 2) * kSeg + lane * 32, buf[0]);
        multiply<MT>(buf[1], (s + 1) * kSeg + lane * 32 < p.K, code, xl + (s + 1) * (kSeg / 4), xunits, p.M,
                     acc);
      }
    }
    store<MT>(p, n0, acc);
  }
}

template <int MT>
cudaError_t launch_f32(const F32Args& p, int optin, cudaStream_t stream) {
  static bool allowed[64] = {};
  const size_t smem = 64 + (size_t)p.M * p.K * 4;
  cudaError_t err = allow_smem(gemm4_f32<MT>, (size_t)optin, allowed);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemm4_f32<MT>, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorNotSupported;
  const int want = (p.groups + kWarps - 1) / kWarps, res = per_sm * sm_count();
  gemm4_f32<MT><<<want < res ? want : res, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_gemm_4bit_gemv. Returns cudaErrorNotSupported, launching nothing, unless: dtype fp32,
// 1 <= M <= 8, K % 32 == 0 (every row starts on a 16-byte boundary), blocksize a power of two >= 32, x and w
// 16-byte aligned, and one token's x (K * 4 bytes) fitting in shared memory. Where all M do not fit, the tokens go
// in groups that do, one launch each (M = 8 at K = 8192 on an H200: 6 + 2).
SHARDQ_API int shardq_gemm_4bit_f32(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                    const float* nested_absmax, const float* nested_code, float offset,
                                    const float* code, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                    int64_t blocksize, int dtype, void* stream_ptr) {
  int dev = 0, optin = 0;
  cudaError_t err = smem_optin(dev, optin);
  if (err != cudaSuccess) return err;
  const Gemm4Args a = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, M, N,
                                    K, blocksize);
  const int64_t fit = (optin - 64) / (K * 4);  // tokens whose x fits in shared memory
  const bool ok = dtype == kF32 && M >= 1 && M <= 8 && N >= 1 && N <= INT32_MAX - kRows && K >= 32 && K % 32 == 0 &&
                  K <= (1 << 24) && a.bs_shift >= 5 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0 &&
                  a.am.given() && fit >= 1;
  if (!ok) return cudaErrorNotSupported;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  for (int64_t m0 = 0; m0 < M; m0 += fit) {  // one launch per group of tokens that fits (each reads W once)
    F32Args p{a, (int)((N + kRows - 1) / kRows)};
    p.M = (int)(M - m0 < fit ? M - m0 : fit);
    p.x = static_cast<const float*>(x) + m0 * K;
    p.out = static_cast<float*>(out) + m0 * N;
    err = p.M == 1 ? launch_f32<1>(p, optin, stream)
          : p.M == 2 ? launch_f32<2>(p, optin, stream)
          : p.M <= 4 ? launch_f32<4>(p, optin, stream)
                     : launch_f32<8>(p, optin, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}
