// LLM.int8() matmul on the int8 tensor cores for small batches (the caller uses it for 5 <= M <= 64):
//   out = epilogue(q @ W.T), q = prepared int8 activations [M, K] (outlier columns zeroed), W int8 [N, K],
// with int32 accumulation in registers and the fused epilogue of int8_common.cuh (scales, outlier part, bias).
//
// Operands are swapped as in gemm_4bit_tc.cu: W is the A operand (16 output features x 32 k; its K-contiguous
// rows are a row-major A) and q is B (k x 8 tokens; "col" B = K-contiguous per token, i.e. q's rows), so one
// A fragment serves all MT = ceil(M / 8) token tiles and the weights stream from HBM exactly once.
//
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32",
// .s8): g = lane >> 2 (groupID), t = lane & 3 (threadID_in_group); register j packs 4 int8, lowest byte first:
//   A (16 x 32): a0 = row g, k 4t..4t+3 | a1 = row g+8, k 4t..4t+3 | a2 = row g, k 16+4t.. | a3 = row g+8, k 16+4t..
//   B (32 x 8):  b0 = col g, k 4t..4t+3 | b1 = col g, k 16+4t..16+4t+3
//   C/D (16 x 8, s32): c0, c1 = row g, cols 2t, 2t+1 | c2, c3 = row g+8, cols 2t, 2t+1
// The k order inside one mma is free as long as A and B use the same one. Lane t loads 16 bytes at k = 16t of a
// 64-k slice for rows g, g+8 (A) and token g (B): the first mma takes bytes 0..7 (logical k 4t+j -> 16t+j and
// 16+4t+j -> 16t+4+j), the second bytes 8..15; over the four t the two mmas cover the slice's 64 k exactly once.
//
// Schedule: a CTA owns R = 16 * TM * WR weight rows and walks all of K in chunks of KC = 64 * WK; warp (wr, wk)
// computes its TM row tiles on slice wk of every chunk. Weights and the q slice go global -> shared through a
// kStages-deep cp.async ring (kStages - 1 chunks in flight, no registers held). At the end the WK partial int32
// sums meet in shared memory (aliasing the drained ring) and the CTA's threads run the epilogue, consecutive
// threads on consecutive n (coalesced stores). q rows past M and W rows past N are never copied (their results
// are dropped); q units past K are zero-filled, so the stale weight bytes there multiply zeros.
#include "int8_common.cuh"

namespace shardq {
namespace {

constexpr int kStages = 4;

// WR warps along rows, WK along K, TM 16-row tiles per warp, MT 8-token tiles.
template <int WR, int WK, int TM, int MT>
struct TcCfg {
  static constexpr int kThreads = 32 * WR * WK;
  static constexpr int kWK = WK;
  static constexpr int R = 16 * TM * WR;        // weight rows (output features) per CTA
  static constexpr int MP = 8 * MT;             // q rows the tiles span (M rounded up to 8)
  static constexpr int KC = 64 * WK;            // k per chunk, 64 per warp slice
  static constexpr int U = KC / 16;             // 16-byte units per staged row
  static constexpr int kStage = (R + MP) * KC;  // bytes per ring stage: R weight rows, then MP q rows
  static constexpr int kWCopies = R * U / kThreads;
  static constexpr int kQCopies = (MP * U + kThreads - 1) / kThreads;
  static constexpr int kRedStride = MP + 1;     // ints per reduction row (odd: conflict-free column reads)
  static constexpr int kSmem = kStages * kStage;
  static_assert(R * U % kThreads == 0, "every thread copies the same number of weight units");
  static_assert(U >= 8, "the swizzle permutes 128-byte groups");
  static constexpr int kRedInts = WK * R * kRedStride;
  static_assert((kRedInts + kStagedOutliers * (R + MP)) * 4 <= kSmem,
                "the reduction buffer and the staged outlier columns fit in the drained ring");
};

// Physical 16-byte unit of unit u in staged row r: odd rows swap the 64-byte halves of each 128 bytes, so the 8
// lanes of one 128-bit access phase (rows 2i, 2i+1 x 4 consecutive units) hit 8 distinct bank groups.
__device__ __forceinline__ int swz(int r, int u) { return u ^ ((r & 1) << 2); }

// cp.async of 16 bytes that reads src_bytes (0 or 16) from global memory and zero-fills the rest.
__device__ __forceinline__ void cp_async16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

// Copy chunk `chunk` (R weight rows and M q rows, KC columns each) into a ring stage.
template <class C>
__device__ __forceinline__ void issue_chunk(const Int8Args& p, int n0, int chunk, uint8_t* dst) {
  const int k0 = chunk * C::KC;
#pragma unroll
  for (int j = 0; j < C::kWCopies; ++j) {
    const int i = threadIdx.x + j * C::kThreads, r = i / C::U, u = i % C::U, k = k0 + u * 16;
    if (n0 + r < p.N && k < p.K)
      cp_async16(dst + (r * C::U + swz(r, u)) * 16, p.w + (int64_t)(n0 + r) * p.K + k);
  }
  uint8_t* qdst = dst + C::R * C::KC;
#pragma unroll
  for (int j = 0; j < C::kQCopies; ++j) {
    const int i = threadIdx.x + j * C::kThreads, m = i / C::U, u = i % C::U, k = k0 + u * 16;
    if (m < p.M)
      cp_async16_zfill(qdst + (m * C::U + swz(m, u)) * 16, p.q + (int64_t)m * p.K + (k < p.K ? k : 0),
                       k < p.K ? 16 : 0);
  }
}

__device__ __forceinline__ void mma16832(int* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Warp (wr, wk)'s 64-k slice of one staged chunk: TM x MT x 2 mmas (fragment mapping in the header comment).
template <class C, int TM, int MT>
__device__ __forceinline__ void compute_slice(const uint8_t* stage, int wr, int wk, int g, int t,
                                              int (&acc)[TM][MT][4]) {
  const uint8_t* qs = stage + C::R * C::KC;
  const int u = wk * 4 + t;  // this lane's 16-byte unit of the slice
  uint4 xv[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = mt * 8 + g;
    xv[mt] = *reinterpret_cast<const uint4*>(qs + (m * C::U + swz(m, u)) * 16);
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int r0 = (wr * TM + i) * 16 + g, r1 = r0 + 8;
    const uint4 w0 = *reinterpret_cast<const uint4*>(stage + (r0 * C::U + swz(r0, u)) * 16);
    const uint4 w1 = *reinterpret_cast<const uint4*>(stage + (r1 * C::U + swz(r1, u)) * 16);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma16832(acc[i][mt], w0.x, w1.x, w0.y, w1.y, xv[mt].x, xv[mt].y);
      mma16832(acc[i][mt], w0.z, w1.z, w0.w, w1.w, xv[mt].z, xv[mt].w);
    }
  }
}

// The WK partial sums of each (row, token) meet in shared memory, beside the staged outlier columns; then the
// epilogue, n fastest across threads.
template <typename T, class C, int TM, int MT>
__device__ __forceinline__ void reduce_store(const Int8Args& p, int* red, int n0, int wr, int wk, int g, int t,
                                             const int (&acc)[TM][MT][4]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int r = (wr * TM + i) * 16 + g + 8 * (c >> 1), m = mt * 8 + 2 * t + (c & 1);
        red[(wk * C::R + r) * C::kRedStride + m] = acc[i][mt][c];
      }
  float* wo = reinterpret_cast<float*>(red + C::kRedInts);
  float* xo = wo + kStagedOutliers * C::R;
  const int staged = stage_outliers<T, C::R>(p, n0, wo, xo, C::kThreads);
  __syncthreads();
  for (int j = threadIdx.x; j < C::R * p.M; j += C::kThreads) {
    const int r = j % C::R, m = j / C::R, n = n0 + r;
    if (n < p.N) {
      int v = 0;
#pragma unroll
      for (int k = 0; k < C::kWK; ++k) v += red[(k * C::R + r) * C::kRedStride + m];
      static_cast<T*>(p.out)[(int64_t)m * p.N + n] = from_f32<T>(epilogue_staged<T, C::R>(p, m, n, r, v, wo, xo,
                                                                                          staged));
    }
  }
}

// Ring over the K chunks: wait for chunk c (at most kStages - 2 newer groups pending), sync (c visible to all, the
// slot of c - 1 free), refill that slot with chunk c + kStages - 1, compute c. One group is committed per
// iteration (possibly empty) so group counts track chunk indices.
template <typename T, int WR, int WK, int TM, int MT>
__global__ void __launch_bounds__(32 * WR * WK) int8_gemm_tc(Int8Args p) {
  using C = TcCfg<WR, WK, TM, MT>;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wr = warp / WK, wk = warp % WK, n0 = blockIdx.x * C::R, nchunks = (p.K + C::KC - 1) / C::KC;
  int acc[TM][MT][4];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][mt][c] = 0;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nchunks) issue_chunk<C>(p, n0, st, smem + st * C::kStage);
    cp_async_commit();
  }
  for (int c = 0; c < nchunks; ++c) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = c + kStages - 1;
    if (next < nchunks) issue_chunk<C>(p, n0, next, smem + (next % kStages) * C::kStage);
    cp_async_commit();
    if (c * C::KC + wk * 64 < p.K) compute_slice<C, TM, MT>(smem + (c % kStages) * C::kStage, wr, wk, g, t, acc);
  }
  cp_async_wait<0>();
  __syncthreads();
  reduce_store<T, C, TM, MT>(p, reinterpret_cast<int*>(smem), n0, wr, wk, g, t, acc);
}

// One CTA per R-row tile; the dynamic shared-memory opt-in is per device and instantiation.
template <typename T, int WR, int WK, int TM, int MT>
cudaError_t launch_tc(const Int8Args& p, cudaStream_t stream) {
  using C = TcCfg<WR, WK, TM, MT>;
  static bool opted[64] = {};
  const cudaError_t err = allow_smem(int8_gemm_tc<T, WR, WK, TM, MT>, C::kSmem, opted);
  if (err != cudaSuccess) return err;
  const unsigned grid = (unsigned)((p.N + C::R - 1) / C::R);
  int8_gemm_tc<T, WR, WK, TM, MT><<<grid, C::kThreads, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

// Token tiles: 8, 16, 32 or 64 staged q rows.
template <typename T, int WR, int WK, int TM>
cudaError_t by_tokens(const Int8Args& p, cudaStream_t stream) {
  if (p.M <= 8) return launch_tc<T, WR, WK, TM, 1>(p, stream);
  if (p.M <= 16) return launch_tc<T, WR, WK, TM, 2>(p, stream);
  if (p.M <= 32) return launch_tc<T, WR, WK, TM, 4>(p, stream);
  return launch_tc<T, WR, WK, TM, 8>(p, stream);
}

// Row tiles of 64, 32 or 16 weight rows: the largest that still gives two CTAs per SM (N = 28672: 64 rows,
// 11008: 32, 4096: 16). Fewer rows per CTA means more L2 traffic for q (each CTA reads all of it).
template <typename T>
cudaError_t dispatch_tc(const Int8Args& p, cudaStream_t stream) {
  const int want = 2 * sm_count();
  if ((p.N + 63) / 64 >= want) return by_tokens<T, 4, 2, 1>(p, stream);
  if ((p.N + 31) / 32 >= want) return by_tokens<T, 2, 4, 1>(p, stream);
  return by_tokens<T, 1, 4, 1>(p, stream);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_int8_gemv. Returns cudaErrorNotSupported, launching nothing, unless: dtype fp16/bf16,
// 1 <= M <= 64, K % 32 == 0, and q and w 16-byte aligned.
SHARDQ_API int shardq_int8_gemm_tc(const void* q, const float* row_absmax, const void* x, const void* w,
                                   const float* scb, const int* list, const int* count, const void* bias, void* out,
                                   int64_t M, int64_t N, int64_t K, int dtype, void* stream_ptr) {
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= 64 && N >= 1 && N <= INT32_MAX / 2 &&
                  K >= 32 && K <= INT32_MAX / 2 && K % 32 == 0 && (uintptr_t)q % 16 == 0 && (uintptr_t)w % 16 == 0;
  if (!ok) return cudaErrorNotSupported;
  const Int8Args p{static_cast<const int8_t*>(q), row_absmax, x, static_cast<const int8_t*>(w), scb, list, count,
                   bias, out, (int)M, (int)N, (int)K};
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  SHARDQ_DISPATCH_16(dtype, T, return dispatch_tc<T>(p, stream));
  return cudaErrorNotSupported;
}
