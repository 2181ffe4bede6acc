// 4-bit (nf4/fp4, optional double quant) matmul for prefill-sized batches, M > 32: out = x @ W.T + bias, with the
// weights dequantized in the load path (no dequantized copy of W in global memory).
//
// Tiling: a CTA owns BN = 128 output features x BM = 64 or 128 tokens and walks K in 64-column k-tiles through an
// S-stage cp.async ring (packed weight bytes and the x tile, one commit group per k-tile). 8 warps = 4 along N x
// 2 along M; a warp owns 32 features (2 row tiles of 16) x BM / 2 tokens (MT tiles of 8).
//
// Operands as in gemm_4bit_tc.cu (verified on GPU): mma.m16n8k16 with the dequantized weights as A (rows =
// output features) and x^T as B (columns = tokens). PTX ISA fragment layout (g = lane >> 2, t = lane & 3):
//   A reg0 = (row g, k 2t..2t+1), reg1 = (row g+8, k 2t..2t+1), reg2 = (row g, k 2t+8..2t+9), reg3 = (row g+8, ...)
//   B reg0 = (k 2t..2t+1, col g), reg1 = (k 2t+8..2t+9, col g)      C c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = row g+8
// The k order inside an mma is free as long as A and B agree per lane: lane t takes the physical k range
// [16t, 16t + 16) of the 64-column k-tile, and mma j (0..3) uses physical 16t + 4j + {0,1} for the slots
// 2t..2t+1 and 16t + 4j + {2,3} for the slots 2t+8..2t+9. So a lane reads 8 contiguous weight bytes per row
// (one 64-bit load) and 16 contiguous x values per token row (two 128-bit loads), no ldmatrix.
//
// Dequantization: a byte becomes its two 16-bit codes (first element = high nibble = low half) with one shift or
// LOP3 and one lookup in a 256-entry pair table kept lane-private in shared memory (conflict-free), then one
// packed multiply by the row's absmax. A 64-column k-tile of a row lies inside one quantization block
// (blocksize >= 64, K % 64 == 0), so each row needs one absmax per k-tile: lane t fetches the one of its 4 rows
// with index t (one k-tile ahead, latency hidden behind the current tile) and gets the others by shuffles.
//
// Shared memory per stage: weights [128 rows][32 bytes] (a half-warp's 64-bit reads cover 4 consecutive rows =
// 128 contiguous bytes: conflict-free); x [BM rows][8 units of 16 bytes], unit v of row m stored at v ^ (m & 1)
// (a quarter-warp's 128-bit reads, rows g and g+1, then hit 8 distinct units: conflict-free).
// Rows past M or N are not copied: their stale shared memory only reaches accumulator rows/columns that are
// never stored (each C element depends on one A row and one B column).
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kThreads = 256;
constexpr int kBN = 128;                // output features per CTA
constexpr int kBK = 64;                 // k per ring stage
constexpr int kWStage = kBN * kBK / 2;  // packed weight bytes per stage

struct MidArgs : Gemm4Args {
  int mtiles, ntiles;
};

// MT token tiles of 8 per warp, S ring stages.
template <int MT, int S>
struct MidCfg {
  static constexpr int BM = 2 * 8 * MT;             // tokens per CTA (2 warps along M)
  static constexpr int kStage = kWStage + BM * kBK * 2;
  static constexpr int kXCopies = BM * 8 / kThreads;  // 16-byte x units per thread and stage
  static constexpr size_t smem() { return (size_t)(kPairTableWords + 256) * 4 + (size_t)S * kStage; }
  static_assert(BM * 8 % kThreads == 0, "x copies must divide evenly");
};

__device__ __forceinline__ int x_unit(int m, int v) { return v ^ (m & 1); }

// Copy k-tile kt (packed weights: one 16-byte unit per thread; x: kXCopies units per thread) into a ring stage.
template <typename T, class C>
__device__ __forceinline__ void issue(const MidArgs& p, int m0, int n0, int kt, uint8_t* dst) {
  const int k0 = kt * kBK, r = threadIdx.x >> 1, u = threadIdx.x & 1;
  if (n0 + r < p.N) cp_async16(dst + r * 32 + u * 16, p.w + (int64_t)(n0 + r) * (p.K / 2) + k0 / 2 + u * 16);
  uint8_t* xdst = dst + kWStage;
  const T* x = static_cast<const T*>(p.x);
#pragma unroll
  for (int j = 0; j < C::kXCopies; ++j) {
    const int i = threadIdx.x + j * kThreads, m = i >> 3, v = i & 7;
    if (m0 + m < p.M) cp_async16(xdst + (m * 8 + x_unit(m, v)) * 16, x + (int64_t)(m0 + m) * p.K + k0 + v * 8);
  }
}

// Per-warp state: its rows and token columns, accumulators, the next k-tile's raw absmax (lane t: row (t >> 1,
// t & 1) of its group) and the current k-tile's scales as 16-bit pairs, [row tile i][half h] (rows g, g + 8).
template <typename T, int MT>
struct MidWarp {
  int wn, wm, g, t, lane;
  float acc[2][MT][4];
  AbsRaw raw;
  uint32_t s2[2][2];

  __device__ __forceinline__ int row(int i, int h) const { return wn * 32 + 16 * i + 8 * h + g; }
  __device__ __forceinline__ int col(int mt) const { return wm * 8 * MT + mt * 8; }

  __device__ __forceinline__ void prefetch(const MidArgs& p, int n0, int kt) {
    const int n = n0 + row(t >> 1, t & 1);
    raw = fetch_abs(p.am, p.bs_shift, n < p.N, (int64_t)n * p.K + kt * kBK);
  }

  // Decode this lane's absmax and spread the 4 rows of its group to the 4 lanes (all lanes take part).
  __device__ __forceinline__ void scales(const MidArgs& p, const float* ncode) {
    const float own = p.am.plain ? raw.v : ncode[raw.q] * raw.v + p.am.offset;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float s = __shfl_sync(0xffffffffu, own, (lane & ~3) | (i << 1) | h);
        s2[i][h] = pack_pair<T>(s, s);
      }
  }

  // One k-tile: per half jh of the lane's 16 columns, load x for all token tiles, then two mma steps (jl) per
  // row tile. Word jh of a row's 8 bytes holds physical k 16t + 8jh + 0..7; its bytes 2jl, 2jl + 1 feed mma
  // j = 2jh + jl, matching x values 16t + 8jh + 4jl + 0..3 (uint4 components x,y for jl = 0, z,w for jl = 1).
  __device__ __forceinline__ void compute(const uint8_t* stage, const uint32_t* table, uint32_t lane4) {
    const uint8_t* xs = stage + kWStage;
    uint2 wv[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) wv[i][h] = *reinterpret_cast<const uint2*>(stage + row(i, h) * 32 + t * 8);
#pragma unroll
    for (int jh = 0; jh < 2; ++jh) {
      uint4 xb[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = col(mt) + g;
        xb[mt] = *reinterpret_cast<const uint4*>(xs + (m * 8 + x_unit(m, 2 * t + jh)) * 16);
      }
#pragma unroll
      for (int jl = 0; jl < 2; ++jl)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const uint32_t e0 = jh ? wv[i][0].y : wv[i][0].x, e1 = jh ? wv[i][1].y : wv[i][1].x;
          const int q = 2 * jl;
          const uint32_t a[4] = {scale_pair<T>(pair_lookup(table, lane4, e0, q), s2[i][0]),
                                 scale_pair<T>(pair_lookup(table, lane4, e1, q), s2[i][1]),
                                 scale_pair<T>(pair_lookup(table, lane4, e0, q + 1), s2[i][0]),
                                 scale_pair<T>(pair_lookup(table, lane4, e1, q + 1), s2[i][1])};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            mma16816<T>(acc[i][mt], a, jl ? xb[mt].z : xb[mt].x, jl ? xb[mt].w : xb[mt].y);
        }
    }
  }

  // acc[i][mt][2h + c] is (feature row(i, h), token col(mt) + 2t + c); bias added in fp32, one rounding.
  __device__ __forceinline__ void store(const MidArgs& p, int m0, int n0) const {
    T* out = static_cast<T*>(p.out);
    const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + row(i, h);
        if (n >= p.N) continue;
        const float b = bias ? to_f32(bias[n]) : 0.f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int m = m0 + col(mt) + 2 * t + c;
            if (m < p.M) out[(int64_t)m * p.N + n] = from_f32<T>(acc[i][mt][2 * h + c] + b);
          }
      }
  }
};

// Ring over the k-tiles: wait for tile kt (at most S-2 newer groups pending), sync (kt is visible to all, the
// slot of kt-1 is free), refill that slot with kt+S-1, compute kt. One group is committed per iteration
// (possibly empty) so group counts track tile indices.
template <typename T, int MT, int S>
__global__ void __launch_bounds__(kThreads, MT <= 4 ? 2 : 1) gemm4_mid(MidArgs p) {
  using C = MidCfg<MT, S>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float* ncode = reinterpret_cast<float*>(smem) + kPairTableWords;
  uint8_t* ring = reinterpret_cast<uint8_t*>(ncode + 256);
  int m0, n0;
  band_tile(p.mtiles, p.ntiles, C::BM, kBN, m0, n0);
  const int nk = p.K / kBK;
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < nk) issue<T, C>(p, m0, n0, st, ring + st * C::kStage);
    cp_async_commit();
  }
  fill_pair_table<T, kThreads>(table, p.code);
  if (!p.am.plain) ncode[threadIdx.x] = __ldg(p.am.nested_code + threadIdx.x);  // 256 threads = 256 entries
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  MidWarp<T, MT> w;
  w.wn = warp >> 1;
  w.wm = warp & 1;
  w.g = lane >> 2;
  w.t = lane & 3;
  w.lane = lane;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) w.acc[i][mt][c] = 0.f;
  w.prefetch(p, n0, 0);
  uint32_t lane4;
  asm("mov.b32 %0, %1;" : "=r"(lane4) : "r"(lane * 4));  // opaque: keeps the lookup's mask-and-or one LOP3
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<S - 2>();
    __syncthreads();
    if (kt + S - 1 < nk) issue<T, C>(p, m0, n0, kt + S - 1, ring + ((kt + S - 1) % S) * C::kStage);
    cp_async_commit();
    w.scales(p, ncode);
    if (kt + 1 < nk) w.prefetch(p, n0, kt + 1);
    w.compute(ring + (kt % S) * C::kStage, table, lane4);
  }
  cp_async_wait<0>();
  w.store(p, m0, n0);
}

// Launch one instantiation: one CTA per (M tile, N tile); the shared-memory opt-in is set once per device.
template <typename T, int MT, int S>
cudaError_t launch_mid(MidArgs p, cudaStream_t stream) {
  using C = MidCfg<MT, S>;
  static bool ready[64] = {};
  const cudaError_t err = allow_smem(gemm4_mid<T, MT, S>, C::smem(), ready);
  if (err != cudaSuccess) return err;
  p.mtiles = (p.M + C::BM - 1) / C::BM;
  p.ntiles = (p.N + kBN - 1) / kBN;
  gemm4_mid<T, MT, S><<<(unsigned)p.mtiles * (unsigned)p.ntiles, kThreads, C::smem(), stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_mid(const MidArgs& p, cudaStream_t stream) {
  // 64-token tiles up to M = 64 (less padding, 2 CTAs/SM), 128-token tiles above (more reuse of each decode).
  if (p.M <= 64) return launch_mid<T, 4, 4>(p, stream);
  return launch_mid<T, 8, 4>(p, stream);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_gemm_4bit_tc. Returns cudaErrorNotSupported, launching nothing, unless: dtype
// fp16/bf16, M >= 1 (meant for M > 32; any M is computed correctly), K % 64 == 0, blocksize a power of two >= 64,
// x and w 16-byte aligned, an absmax given, and at most 2^31 - 1 CTAs (64-token tiles counted).
SHARDQ_API int shardq_gemm_4bit_mid(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                    const float* nested_absmax, const float* nested_code, float offset,
                                    const float* code, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                    int64_t blocksize, int dtype, void* stream_ptr) {
  const Gemm4Args a = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, M, N,
                                    K, blocksize);
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= INT32_MAX && N >= 1 && N <= INT32_MAX &&
                  K >= kBK && K <= INT32_MAX && K % kBK == 0 && a.bs_shift >= 6 &&
                  ((M + 63) / 64) * ((N + kBN - 1) / kBN) <= INT32_MAX && (uintptr_t)x % 16 == 0 &&
                  (uintptr_t)w % 16 == 0 && a.am.given();
  if (!ok) return cudaErrorNotSupported;
  const MidArgs p{a, 0, 0};
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  SHARDQ_DISPATCH_16(dtype, T, return dispatch_mid<T>(p, stream));
  return cudaErrorNotSupported;
}
