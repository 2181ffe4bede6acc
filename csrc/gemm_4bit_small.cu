// 4-bit (nf4/fp4, optional double quant) matmul for decode-sized batches (M <= 32): out = x @ W.T + bias.
//
// Fast path (fp16/bf16, K % 32 == 0, power-of-two blocksize >= 32, 16-byte aligned): each thread streams
// 16 packed bytes (32 weights of one row) per step with one 128-bit load, so every weight byte is read once.
// A byte becomes a pair of 16-bit codes through a 256-entry table kept lane-private in shared memory
// (entry e of lane l sits in bank l, so lookups never conflict), is scaled by its block's absmax (decoded
// inline for double quant) and fed to tensor-core mma.m16n8k16 with fp32 accumulation. The k order inside
// each mma is permuted identically for x and W (a dot product does not care), which lets the 32 contiguous
// weights a thread loaded map straight onto its B fragments. The 8 warps of a CTA split K step by step (512
// contiguous bytes per row per round) and reduce in shared memory; CTAs stride over groups of 8*NT output rows.
// This is the fallback of gemm_4bit_tc.cu (the faster kernel, bench/RESULTS.md) where that one refuses a shape:
// K % 128 != 0, blocksize 32, or M > 8 with fewer row tiles than SMs.
//
// Other layouts (fp32, K % 32 != 0, rows starting mid-byte, blocksizes below 32, unaligned pointers) are refused:
// gemm_4bit dequantizes them and calls cuBLAS, which measured faster at every M than a per-element CUDA-core
// kernel (4097x1000 on an H200, bench/RESULTS.md).
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTableWords = 256 * 32;

__device__ __forceinline__ uint32_t byte_of(const uint4& v, int q) {
  const uint32_t w = q < 4 ? v.x : q < 8 ? v.y : q < 12 ? v.z : v.w;
  return (w >> ((q & 3) * 8)) & 0xFF;
}

using Small4Args = Gemm4Args;

// Loads the 16 packed bytes and the block scale of row n at column kt (zeros outside the matrix).
template <typename T>
__device__ __forceinline__ void load_w(const Small4Args& p, int n, int kt, uint4& wv, uint32_t& sc) {
  if (kt < p.K && n < p.N) {
    const int64_t e = (int64_t)n * p.K + kt;
    wv = __ldcs(reinterpret_cast<const uint4*>(p.w + (e >> 1)));
    const float s = p.am.get(e >> p.bs_shift);
    sc = pack_pair<T>(s, s);
  } else {
    wv = make_uint4(0, 0, 0, 0);
    sc = 0;
  }
}

// 32 activations of row r at columns kt.. as 16 packed pairs (zeros outside x).
template <typename T>
__device__ __forceinline__ void load_x(const Small4Args& p, int r, int kt, uint32_t* dst) {
  if (r < p.M && kt < p.K) {
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + (int64_t)r * p.K + kt);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 v = __ldg(src + q);
      dst[4 * q] = v.x; dst[4 * q + 1] = v.y; dst[4 * q + 2] = v.z; dst[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int q = 0; q < 16; ++q) dst[q] = 0;
  }
}

// One 128-column step: dequantize NT 16-byte weight words through the table and feed MT m16 tiles to the tensor
// cores. LOW8 (M <= 8): rows 8..15 of the tile are zero, so their activations are never loaded.
template <typename T, int NT, int MT, bool LOW8>
__device__ __forceinline__ void mma_step(const uint32_t* tbl, const uint4* wv, const uint32_t* sc,
                                         uint32_t (*xa)[2][16], float (*acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    uint32_t b[NT][2];
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      b[i][0] = scale_pair<T>(tbl[byte_of(wv[i], 2 * j) * 32], sc[i]);
      b[i][1] = scale_pair<T>(tbl[byte_of(wv[i], 2 * j + 1) * 32], sc[i]);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const uint32_t a[4] = {xa[mt][0][2 * j], LOW8 ? 0u : xa[mt][1][2 * j], xa[mt][0][2 * j + 1],
                             LOW8 ? 0u : xa[mt][1][2 * j + 1]};
#pragma unroll
      for (int i = 0; i < NT; ++i) mma16816<T>(acc[mt][i], a, b[i][0], b[i][1]);
    }
  }
}

// Writes a warp's mma accumulators (m16n8 fragments: lane = 4*g + t holds rows g, g+8 and columns 2t, 2t+1) into
// its slice of the reduction buffer red[kWarps][MT*16][NT*8].
template <int NT, int MT>
__device__ __forceinline__ void stash_acc(float* red, int warp, int g, int t, const float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int m = mt * 16 + g + (c >> 1) * 8, nl = i * 8 + 2 * t + (c & 1);
        red[(warp * MT * 16 + m) * NT * 8 + nl] = acc[mt][i][c];
      }
}

template <typename T, int NT, int MT>
__global__ void __launch_bounds__(kThreads) gemm4_small_mma(Small4Args p) {
  extern __shared__ uint32_t smem[];
  uint32_t* table = smem;                                        // [256 bytes][32 lanes]
  float* red = reinterpret_cast<float*>(smem + kTableWords);     // [kWarps][MT*16][NT*8]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  for (int i = tid; i < kTableWords; i += kThreads) {
    const int byte = i >> 5;
    table[i] = pack_pair<T>(__ldg(p.code + (byte >> 4)), __ldg(p.code + (byte & 15)));
  }
  __syncthreads();
  const uint32_t* tbl = table + lane;
  const int nsteps = (p.K + 127) / 128;
  const int ngroups = (p.N + NT * 8 - 1) / (NT * 8);
  for (int grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
    const int n0 = grp * NT * 8;
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mt][i][c] = 0.f;
    uint4 wv[NT];
    uint32_t sc[NT];
#pragma unroll
    for (int i = 0; i < NT; ++i) load_w<T>(p, n0 + 8 * i + g, warp * 128 + t * 32, wv[i], sc[i]);
    for (int s = warp; s < nsteps; s += kWarps) {
      const int kt = s * 128 + t * 32;
      uint4 cw[NT];
      uint32_t cs[NT];
#pragma unroll
      for (int i = 0; i < NT; ++i) { cw[i] = wv[i]; cs[i] = sc[i]; }
#pragma unroll
      for (int i = 0; i < NT; ++i) load_w<T>(p, n0 + 8 * i + g, kt + kWarps * 128, wv[i], sc[i]);
      uint32_t xa[MT][2][16];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        load_x<T>(p, mt * 16 + g, kt, xa[mt][0]);
        load_x<T>(p, mt * 16 + g + 8, kt, xa[mt][1]);
      }
      mma_step<T, NT, MT, false>(tbl, cw, cs, xa, acc);
    }
    stash_acc<NT, MT>(red, warp, g, t, acc);
    __syncthreads();
    for (int idx = tid; idx < MT * 16 * NT * 8; idx += kThreads) {
      const int m = idx / (NT * 8), nl = idx % (NT * 8), n = n0 + nl;
      if (m < p.M && n < p.N) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[(w * MT * 16 + m) * NT * 8 + nl];
        if (p.bias) s += to_f32(static_cast<const T*>(p.bias)[n]);
        static_cast<T*>(p.out)[(int64_t)m * p.N + n] = from_f32<T>(s);
      }
    }
    __syncthreads();
  }
}

template <typename T, int NT, int MT>
cudaError_t launch_mma(const Small4Args& p, cudaStream_t stream) {
  const int smem = (kTableWords + kWarps * MT * 16 * NT * 8) * 4;
  static bool configured[64] = {};
  const cudaError_t err = allow_smem(gemm4_small_mma<T, NT, MT>, smem, configured);
  if (err != cudaSuccess) return err;
  const int ngroups = (p.N + NT * 8 - 1) / (NT * 8);
  const int grid = ngroups < 3 * sm_count() ? ngroups : 3 * sm_count();
  gemm4_small_mma<T, NT, MT><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_mma(const Small4Args& p, cudaStream_t stream) {
  const int sms = sm_count();
  const bool two_m = p.M > 16;
  if (p.N >= 64 * sms) return two_m ? launch_mma<T, 4, 2>(p, stream) : launch_mma<T, 4, 1>(p, stream);
  if (p.N >= 16 * sms) return two_m ? launch_mma<T, 2, 2>(p, stream) : launch_mma<T, 2, 1>(p, stream);
  return two_m ? launch_mma<T, 1, 2>(p, stream) : launch_mma<T, 1, 1>(p, stream);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// out[M,N] = x[M,K] @ W[N,K].T (+ bias). absmax: fp32 per block, or (absmax_q, nested_absmax, nested_code,
// offset) for double quant. Returns cudaErrorNotSupported, launching nothing, unless fp16/bf16, M <= 32,
// K % 32 == 0, a power-of-two blocksize >= 32 and 16-byte aligned x and w.
SHARDQ_API int shardq_gemm_4bit_small(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                      const float* nested_absmax, const float* nested_code, float offset,
                                      const float* code, const void* bias, void* out, int64_t M, int64_t N,
                                      int64_t K, int64_t blocksize, int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (M <= 0 || N <= 0 || K <= 0 || blocksize <= 0 || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX)
    return cudaErrorInvalidValue;
  const bool aligned = ((uintptr_t)x % 16 == 0) && ((uintptr_t)w % 16 == 0);
  const Small4Args p = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out,
                                     M, N, K, blocksize);
  const bool fast = dtype != kF32 && M <= 32 && K % 32 == 0 && p.bs_shift >= 5 && aligned;
  if (fast) {
    SHARDQ_DISPATCH_16(dtype, T, return dispatch_mma<T>(p, stream));
  }
  return cudaErrorNotSupported;
}
