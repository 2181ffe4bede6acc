// 4-bit (nf4/fp4, optional double quant) matmul for M <= 16 tokens: out = x @ W.T + bias, reading every packed
// weight byte once, straight from global memory into registers. Tokens 9..16 are a second mma operand fragment
// reusing each looked-up weight pair (fewer slices in flight to stay within the registers). Where x is too large to
// stage whole (16 tokens at K = 8192 is 256 KB), shardq_gemm_4bit_gemv_split halves K across CTAs.
//
// Why (ncu on an H200, bench/RESULTS.md): the ring kernel (gemm_4bit_tc.cu) issued ~9.8 thread instructions per
// packed byte at M = 1, ~60 % of them bookkeeping (cp.async addresses, ring waits, barriers, scale shuffles). This
// kernel keeps the tensor-core mma with the weights as the A operand and drops the rest:
//   - no shared-memory ring: each lane loads 16 contiguous packed bytes per row and 128-column piece with one
//     128-bit load, slices of 2 pieces (128 contiguous bytes per row) kDepth ahead of use in registers; the only
//     per-slice bookkeeping is pointer increments;
//   - the L1/shared pipeline is the scarce resource (a first version with 64-bit loads and a scale load per block
//     and row ran at 83 % L1 throughput and 46 % of HBM), so weights come as 128-bit loads (8 rows x 64 bytes per
//     request), scales as one load per row and piece (per row and slice with blocksize 64), and x (all M <= 16
//     tokens, whole K) is staged in shared memory once per CTA, swizzled so that its 128-bit reads never conflict;
//   - a lookup is one PRMT and one LDS: the PRMT builds the offset (byte << 8 | lane * 4) from the packed word and
//     a register holding lane * 4, so the 256-entry pair table is lane-private at a 256-byte stride (64 KB; entry e
//     of lane l in bank l: lookups never conflict);
//   - a lane's 32 weights span half a quantization block (blocksize 64), so an mma's k range mixes two blocks:
//     each looked-up pair is scaled by its block's absmax (one HMUL2, in the activation dtype, as the reference
//     dequantizes) before the mma, which accumulates in fp32.
// Work split: a CTA holds two independent groups of 8 warps; a group owns one 16-row tile at a time (tiles strided
// over all groups of the persistent grid), each warp a contiguous eighth of the tile's slices, and the
// 8 partial sums meet in shared memory (two buffers, one named barrier per tile).
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kWarpsK = 8;                      // warps per group, along K
constexpr int kGroups = 2;                      // groups per CTA
constexpr int kThreads = 32 * kWarpsK * kGroups;
constexpr int kTableBytes = 256 * 256;          // entry e of lane l at byte e * 256 + l * 4
// Partial sums per group: 2 buffers x warps x 16 rows x 8 tokens per token fragment (NT = 1 for M <= 8, 2 for
// M <= 16).
__host__ __device__ constexpr int red_floats(int nt) { return 2 * kWarpsK * 16 * 8 * nt; }

struct GemvArgs : Gemm4Args {
  float* ws;  // halves == 2: fp32 [M, N] the two K halves add into (zeroed before the launch), else null
  int tiles, xstride;  // xstride: bytes between staged x rows
  int halves;  // 1, or 2: even CTAs take the first half of K and odd CTAs the second (x for half of K staged)
};

inline int token_fragments(int M) { return M > 8 ? 2 : 1; }

inline size_t gemv_smem(int M, int K, int tsize) {  // K: the columns one CTA stages x for
  return (size_t)kTableBytes + (256 + (size_t)kGroups * red_floats(token_fragments(M))) * 4 +
         (size_t)M * (K * tsize + 32);
}

// One slice of P * 128 columns of a lane's two rows (g, g + 8): in each 128-column piece, 16 packed bytes per row
// (32 weights at 32 t) and the raw scale of the block holding them.
template <int P>
struct Slice {
  uint4 w[P][2];
  AbsRaw a[P][2];
  float4 a4[2];  // kAbsPlain4: the slice's four block scales per row, picked from only when used
};

// Pair of byte Q of wd: the table offset (wd.byte[Q] << 8) | lane * 4 is one PRMT.
template <int Q>
__device__ __forceinline__ uint32_t lookup(uint32_t table, uint32_t lane4, uint32_t wd) {
  uint32_t off, v;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(off) : "r"(wd), "r"(lane4), "n"(0x5504 | (Q << 4)));
  asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(table + off));
  return v;
}

// 16 packed bytes read once: not kept in L1, and L2 fetches the surrounding 256 bytes (longer DRAM bursts; measured
// against ld.global.cs and plain no_allocate on an H200: 55.1 vs 57.3 us at 8192x28672, M = 1).
__device__ __forceinline__ uint4 load_weights(const uint8_t* src) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(src));
  return v;
}

// Scale modes: plain fp32 absmax loaded per piece and row; double quant; plain with blocksize 64 and 2 pieces, where
// one 128-bit load per row brings the slice's four block scales (half the scale requests, which were half of all
// L1 requests of a slice; H200, 8192x28672, M = 1: 52.8 vs 55.4 us).
enum AbsMode : int { kAbsPlain = 0, kAbsNested = 1, kAbsPlain4 = 2 };

// A warp's walk over its slices [lo, hi) of each of its group's tiles: where the next slice to load is.
template <int kAbs, int P>
struct Loader {
  static constexpr bool kPlain = kAbs != kAbsNested;
  const uint8_t* wp[2];  // this lane's 16 bytes of the slice in rows g and g + 8
  const float* ap[2];    // plain: absmax of row g / g + 8 at column 0
  const uint8_t* qp[2];  // double quant: the same for the 8-bit codes
  int64_t blk[2];        // double quant: block index of column 0
  int s, tile, lo, hi;

  __device__ __forceinline__ void start(const GemvArgs& p, int g, int t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = min(tile * 16 + g + 8 * h, p.N - 1);
      wp[h] = p.w + (int64_t)n * (p.K / 2) + s * 64 * P + t * 16;
      const int64_t b = ((int64_t)n * p.K) >> p.bs_shift;  // K % blocksize == 0: rows start on a block
      if (kPlain) {
        ap[h] = p.am.plain + b;
      } else {
        qp[h] = p.am.q + b;
        blk[h] = b;
      }
    }
  }

  __device__ __forceinline__ void load(const GemvArgs& p, int t, Slice<P>& d) const {
    if (kAbs == kAbsPlain4) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        d.a4[h] = __ldg(reinterpret_cast<const float4*>(ap[h] + s * 4));  // blocks 4s .. 4s + 3
      }
    }
#pragma unroll
    for (int q = 0; q < P; ++q) {
      const int i = (s * 128 * P + q * 128 + t * 32) >> p.bs_shift;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        d.w[q][h] = load_weights(wp[h] + q * 64);
        if (kAbs == kAbsPlain) {
          d.a[q][h].v = __ldg(ap[h] + i);
        } else if (kAbs == kAbsNested) {
          d.a[q][h].q = __ldg(qp[h] + i);
          d.a[q][h].v = __ldg(p.am.nested_absmax + ((blk[h] + i) >> 8));
        }
      }
    }
  }

  __device__ __forceinline__ void next(const GemvArgs& p, int groups, int g, int t) {
    if (++s < hi) {
      wp[0] += 64 * P;
      wp[1] += 64 * P;
    } else {
      s = lo;
      tile += groups;
      start(p, g, t);
    }
  }
};

// Staged x: 16-byte unit u of a row sits at u ^ bit3(u), so that the four lanes of a quarter-warp reading units
// 4t + c (t = 0..3) hit distinct banks; rows are 2K + 32 bytes apart so that two tokens' rows do not collide.
__device__ __forceinline__ int x_unit(int u) { return u ^ ((u >> 3) & 1); }

// Piece product: per token fragment 8 mma (two chains), each over 16 k of rows g and g + 8 with the pairs
// pre-scaled; fragment f holds tokens 8f .. 8f + 7 (x rows at xe[f] / xo[f]).
template <typename T, int NT>
__device__ __forceinline__ void multiply(const uint4 (&w)[2], const uint32_t (&sc)[2], const uint8_t* const (&xe)[NT],
                                         const uint8_t* const (&xo)[NT], uint32_t table, uint32_t lane4,
                                         float (&acc)[NT][2][4]) {
  uint4 xv[NT][4];
#pragma unroll
  for (int f = 0; f < NT; ++f)
#pragma unroll
    for (int c = 0; c < 4; ++c) xv[f][c] = *reinterpret_cast<const uint4*>((c & 1 ? xo[f] : xe[f]) + 16 * c);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t w0 = j == 0 ? w[0].x : j == 1 ? w[0].y : j == 2 ? w[0].z : w[0].w;
    const uint32_t w1 = j == 0 ? w[1].x : j == 1 ? w[1].y : j == 2 ? w[1].z : w[1].w;
    uint32_t a[4];
    a[0] = scale_pair<T>(lookup<0>(table, lane4, w0), sc[0]);
    a[1] = scale_pair<T>(lookup<0>(table, lane4, w1), sc[1]);
    a[2] = scale_pair<T>(lookup<1>(table, lane4, w0), sc[0]);
    a[3] = scale_pair<T>(lookup<1>(table, lane4, w1), sc[1]);
#pragma unroll
    for (int f = 0; f < NT; ++f) mma16816<T>(acc[f][0], a, xv[f][j].x, xv[f][j].y);
    a[0] = scale_pair<T>(lookup<2>(table, lane4, w0), sc[0]);
    a[1] = scale_pair<T>(lookup<2>(table, lane4, w1), sc[1]);
    a[2] = scale_pair<T>(lookup<3>(table, lane4, w0), sc[0]);
    a[3] = scale_pair<T>(lookup<3>(table, lane4, w1), sc[1]);
#pragma unroll
    for (int f = 0; f < NT; ++f) mma16816<T>(acc[f][1], a, xv[f][j].z, xv[f][j].w);
  }
}

__device__ __forceinline__ void group_sync(int group) {
  asm volatile("bar.sync %0, %1;" ::"r"(1 + group), "n"(32 * kWarpsK) : "memory");
}

// End of a tile: the group's 8 warps add their partial sums (buffer `red`), add the bias and store.
template <typename T, int NT>
__device__ __forceinline__ void finish(const GemvArgs& p, float* red, int group, int wk, int g, int t, int tile,
                                       float (&acc)[NT][2][4]) {
  constexpr int kTok = 8 * NT;
#pragma unroll
  for (int f = 0; f < NT; ++f)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int tok = 8 * f + 2 * t + (c & 1), r = g + 8 * (c >> 1);
      if (tok < p.M) red[(wk * 16 + r) * kTok + tok] = acc[f][0][c] + acc[f][1][c];
      acc[f][0][c] = acc[f][1][c] = 0.f;
    }
  group_sync(group);
#pragma unroll
  for (int i = 0; i < (16 * kTok + 32 * kWarpsK - 1) / (32 * kWarpsK); ++i) {
    const int j = threadIdx.x % (32 * kWarpsK) + i * 32 * kWarpsK, r = j % 16, tok = j / 16, n = tile * 16 + r;
    if (tok < p.M && n < p.N) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < kWarpsK; ++k) v += red[(k * 16 + r) * kTok + tok];
      if (p.ws != nullptr) {  // a K half: the other half adds into the same sum, sum_parts adds the bias
        atomicAdd(p.ws + (int64_t)tok * p.N + n, v);
      } else {
        if (p.bias) v += to_f32(static_cast<const T*>(p.bias)[n]);
        static_cast<T*>(p.out)[(int64_t)tok * p.N + n] = from_f32<T>(v);
      }
    }
  }
}

// The pair table (entry e of lane l at byte e * 256 + l * 4), the double-quant code, and x's columns of this CTA's
// K half (all of K when halves == 1), swizzled.
template <typename T, bool kPlain>
__device__ __forceinline__ void stage(const GemvArgs& p, uint8_t* table, float* ncode, uint8_t* xs, int half) {
  for (int i = threadIdx.x; i < 256 * 8; i += kThreads) {
    const uint32_t v = pack_pair<T>(__ldg(p.code + (i >> 7)), __ldg(p.code + ((i >> 3) & 15)));
    *reinterpret_cast<uint4*>(table + (i >> 3) * 256 + (i & 7) * 16) = make_uint4(v, v, v, v);
  }
  const int xunits = p.K / 8 / p.halves;
  for (int i = threadIdx.x; i < p.M * xunits; i += kThreads) {
    const int m = i / xunits, u = i % xunits;
    *reinterpret_cast<uint4*>(xs + m * p.xstride + x_unit(u) * 16) =
        __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + (int64_t)m * p.K) + half * xunits + u);
  }
  if (!kPlain && threadIdx.x < 256) ncode[threadIdx.x] = __ldg(p.am.nested_code + threadIdx.x);
}

// Stages the pair table and x, then each group walks its tiles; per warp, slices are loaded kDepth ahead.
template <typename T, int kAbs, int P, int NT>
__global__ void __launch_bounds__(kThreads, 1) gemm4_gemv(GemvArgs p) {
  constexpr bool kPlain = kAbs != kAbsNested;
  constexpr int kDepth = (P == 1 ? 4 : 2) / NT;  // slices loaded ahead per warp (as many as the registers hold)
  constexpr int kRedFloats = red_floats(NT);
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* table = smem;
  float* ncode = reinterpret_cast<float*>(smem + kTableBytes);
  float* red_all = ncode + 256;
  uint8_t* xs = reinterpret_cast<uint8_t*>(red_all + kGroups * kRedFloats);
  const int half = blockIdx.x % p.halves, cta = blockIdx.x / p.halves;  // halves == 2: the grid is even
  stage<T, kPlain>(p, table, ncode, xs, half);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, group = warp / kWarpsK, wk = warp % kWarpsK;
  const int g = lane >> 2, t = lane & 3, groups = gridDim.x / p.halves * kGroups;
  float* red = red_all + group * kRedFloats;
  // slices are numbered over all of K (weights and scales are addressed by them); this CTA's half starts at s0
  const int first = cta * kGroups + group, nslices = p.K / (128 * P) / p.halves, s0 = half * nslices;
  const int my_tiles = first < p.tiles ? (p.tiles - first + groups - 1) / groups : 0;
  Loader<kAbs, P> ld;
  ld.lo = s0 + wk * nslices / kWarpsK;
  ld.hi = s0 + (wk + 1) * nslices / kWarpsK;
  ld.s = ld.lo;
  ld.tile = first;
  const int items = my_tiles * (ld.hi - ld.lo);
  if (items > 0) ld.start(p, g, t);
  uint32_t lane4;
  asm("mov.b32 %0, %1;" : "=r"(lane4) : "r"(lane * 4));
  const uint32_t table_addr = static_cast<uint32_t>(__cvta_generic_to_shared(table));
  // this lane's x (token g of each fragment): units 4t + c of each slice, at x_unit(): +16 for even c and -16 for
  // odd c where bit3 is set
  const uint8_t* xrow[NT];
#pragma unroll
  for (int f = 0; f < NT; ++f) xrow[f] = xs + min(g + 8 * f, p.M - 1) * p.xstride + t * 64;
  const int flip = (t >> 1) * 16;
  // kDepth slices in flight while one is multiplied: a ring of kDepth + 1 register sets, unrolled so that every
  // set keeps its registers (slot d is multiplied while slot d - 1, just used, is refilled).
  constexpr int kRing = kDepth + 1;
  Slice<P> buf[kRing];
#pragma unroll
  for (int d = 0; d < kDepth; ++d)
    if (d < items) {
      ld.load(p, t, buf[d]);
      ld.next(p, groups, g, t);
    }
  float acc[NT][2][4] = {};
  int s = ld.lo, tile = first, tiles_done = 0;
  for (int i = 0; i < items; i += kRing) {
#pragma unroll
    for (int d = 0; d < kRing; ++d) {
      if (i + d < items) {
        if (i + d + kDepth < items) {
          ld.load(p, t, buf[(d + kDepth) % kRing]);
          ld.next(p, groups, g, t);
        }
#pragma unroll
        for (int q = 0; q < P; ++q) {
          uint32_t sc[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float4& a4 = buf[d].a4[h];  // piece q of lane t: block 4s + 2q + t / 2
            const float v = kAbs == kAbsPlain4 ? (q == 0 ? (t >> 1 ? a4.y : a4.x) : (t >> 1 ? a4.w : a4.z))
                            : kPlain           ? buf[d].a[q][h].v
                                               : decode_abs(p.am, ncode, buf[d].a[q][h]);
            sc[h] = pack_pair<T>(v, v);
          }
          const uint8_t* xe[NT];
          const uint8_t* xo[NT];
#pragma unroll
          for (int f = 0; f < NT; ++f) {
            xe[f] = xrow[f] + (s - s0) * 256 * P + 256 * q + flip;
            xo[f] = xrow[f] + (s - s0) * 256 * P + 256 * q - flip;
          }
          multiply<T, NT>(buf[d].w[q], sc, xe, xo, table_addr, lane4, acc);
        }
        if (++s == ld.hi) {
          finish<T, NT>(p, red + (tiles_done & 1) * (kRedFloats / 2), group, wk, g, t, tile, acc);
          s = ld.lo;
          tile += groups;
          ++tiles_done;
        }
      }
    }
  }
}

// Launches one instantiation as a persistent grid. Resident CTAs per SM are cached per device and shared-memory
// size (a small direct-mapped cache: a lost race costs one more occupancy query, a stale entry only the grid size).
template <typename T, int kAbs, int P, int NT>
cudaError_t launch_gemv(GemvArgs p, int dev, size_t smem, int optin, cudaStream_t stream) {
  struct Entry {
    size_t smem;
    int per_sm;
  };
  static bool allowed[64] = {};
  static Entry cache[64][16] = {};
  cudaError_t err = allow_smem(gemm4_gemv<T, kAbs, P, NT>, (size_t)optin, allowed);
  if (err != cudaSuccess) return err;
  Entry& e = cache[dev][(smem / 16) % 16];
  if (e.smem != smem || e.per_sm < 1) {
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemm4_gemv<T, kAbs, P, NT>, kThreads, smem);
    if (err != cudaSuccess) return err;
    if (per_sm < 1) return cudaErrorNotSupported;
    e.per_sm = per_sm;
    e.smem = smem;
  }
  p.tiles = (p.N + 15) / 16;
  const int want = (p.tiles + kGroups - 1) / kGroups * p.halves, res = e.per_sm * sm_count() / p.halves * p.halves;
  if (res < p.halves) return cudaErrorNotSupported;
  if (p.halves == 2) {
    err = cudaMemsetAsync(p.ws, 0, (size_t)p.M * p.N * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }
  gemm4_gemv<T, kAbs, P, NT><<<want < res ? want : res, kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.halves == 1) return err;
  return launch_sum_parts<T>(p.ws, 1, p.bias, p.out, p.M, p.N, stream);
}

// Columns per slice = 128 * pieces: 2 (128 contiguous bytes per row and slice) where that divides K and still gives
// every warp a slice, else 1. Measured on an H200 at 8192x28672, M = 1: 61.6 us with 1 piece, 55.1 with 2; 4 pieces
// (55.7) leave registers for one slice in flight only.
inline int pieces_for(int K) { return K % 256 == 0 && K / 256 >= kWarpsK ? 2 : 1; }

template <typename T, int NT>
cudaError_t launch_pieces(const GemvArgs& p, bool plain4_ok, cudaStream_t stream) {
  int dev = 0, optin = 0;
  const cudaError_t err = smem_optin(dev, optin);
  if (err != cudaSuccess) return err;
  const int kh = p.K / p.halves;
  const size_t smem = gemv_smem(p.M, kh, (int)sizeof(T));
  if (smem > (size_t)optin) return cudaErrorNotSupported;
  const bool nested = p.am.plain == nullptr, two = pieces_for(kh) == 2;
  if (nested) {
    return two ? launch_gemv<T, kAbsNested, 2, NT>(p, dev, smem, optin, stream)
               : launch_gemv<T, kAbsNested, 1, NT>(p, dev, smem, optin, stream);
  }
  if (two && plain4_ok) return launch_gemv<T, kAbsPlain4, 2, NT>(p, dev, smem, optin, stream);
  return two ? launch_gemv<T, kAbsPlain, 2, NT>(p, dev, smem, optin, stream)
             : launch_gemv<T, kAbsPlain, 1, NT>(p, dev, smem, optin, stream);
}

// Checks the preconditions shared by both entry points and runs the launch; halves == 2 needs ws (fp32 [M, N]).
inline int gemv_entry(const void* x, const void* w, const float* absmax, const void* absmax_q,
                      const float* nested_absmax, const float* nested_code, float offset, const float* code,
                      const void* bias, void* out, float* ws, int halves, int64_t M, int64_t N, int64_t K,
                      int64_t blocksize, int dtype, cudaStream_t stream) {
  const Gemm4Args a = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, M, N,
                                    K, blocksize);
  const int64_t kh = K / halves;
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= 16 && N >= 1 && N <= INT32_MAX / 16 &&
                  K % (128 * halves) == 0 && kh >= 128 * kWarpsK && K <= (1 << 20) && a.bs_shift >= 6 &&
                  a.bs_shift <= 10 && K % blocksize == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0 &&
                  a.am.given() && (halves == 1 || ws != nullptr);
  if (!ok) return cudaErrorNotSupported;
  const GemvArgs p{a, ws, 0, (int)kh * 2 + 32, halves};
  const bool plain4_ok = absmax != nullptr && a.bs_shift == 6 && (uintptr_t)absmax % 16 == 0;
  SHARDQ_DISPATCH_16(dtype, T, {
    return token_fragments(p.M) == 2 ? launch_pieces<T, 2>(p, plain4_ok, stream)
                                     : launch_pieces<T, 1>(p, plain4_ok, stream);
  });
  return cudaErrorNotSupported;
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_gemm_4bit_tc. Returns cudaErrorNotSupported, launching nothing, unless: dtype fp16/bf16,
// 1 <= M <= 16, K % 128 == 0 and K >= 1024 (a slice for every warp), blocksize a power of two in [64, 1024] dividing
// K, x and w 16-byte aligned, and the staged x fitting in shared memory beside the 64 KB table.
SHARDQ_API int shardq_gemm_4bit_gemv(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                     const float* nested_absmax, const float* nested_code, float offset,
                                     const float* code, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                     int64_t blocksize, int dtype, void* stream_ptr) {
  return gemv_entry(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, nullptr, 1, M, N, K,
                    blocksize, dtype, static_cast<cudaStream_t>(stream_ptr));
}

// K split in two halves (for x too large to stage whole: e.g. 16 tokens at K = 8192): each CTA stages x for one
// half, the halves' sums meet in ws (fp32 [M, N], scratch; zeroed here) by atomic adds, and a second launch writes
// out = ws + bias. Same preconditions as shardq_gemm_4bit_gemv with K / 2 in place of K (K % 256 == 0,
// K >= 2048, x for K / 2 fitting).
SHARDQ_API int shardq_gemm_4bit_gemv_split(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                           const float* nested_absmax, const float* nested_code, float offset,
                                           const float* code, const void* bias, void* out, void* ws, int64_t M,
                                           int64_t N, int64_t K, int64_t blocksize, int dtype, void* stream_ptr) {
  return gemv_entry(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out,
                    static_cast<float*>(ws), 2, M, N, K, blocksize, dtype, static_cast<cudaStream_t>(stream_ptr));
}
