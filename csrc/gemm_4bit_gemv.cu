// 4-bit (nf4/fp4, optional double quant) matmul for M <= 8 tokens: out = x @ W.T + bias, reading every packed
// weight byte once, straight from global memory into registers.
//
// Why (ncu on an H200, bench/RESULTS.md): the ring kernel (gemm_4bit_tc.cu) issued ~9.8 thread instructions per
// packed byte at M = 1, ~60 % of them bookkeeping (cp.async addresses, ring waits, barriers, scale shuffles). This
// kernel keeps the tensor-core mma with the weights as the A operand and drops the rest:
//   - no shared-memory ring: each lane loads 16 contiguous packed bytes per row and 128-column piece with one
//     128-bit load, slices of 2 pieces (128 contiguous bytes per row) kDepth ahead of use in registers; the only
//     per-slice bookkeeping is pointer increments;
//   - the L1/shared pipeline is the scarce resource (a first version with 64-bit loads and a scale load per block
//     and row ran at 83 % L1 throughput and 46 % of HBM), so weights come as 128-bit loads (8 rows x 64 bytes per
//     request), scales as one load per row and piece (per row and slice with blocksize 64), and x (all M <= 8
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
constexpr int kRedFloats = 2 * kWarpsK * 16 * 8;  // per group: 2 buffers x warps x 16 rows x 8 tokens

struct GemvArgs : Gemm4Args {
  int tiles, xstride;  // xstride: bytes between staged x rows
};

inline size_t gemv_smem(int M, int K, int tsize) {
  return (size_t)kTableBytes + (256 + (size_t)kGroups * kRedFloats) * 4 + (size_t)M * (K * tsize + 32);
}

// One slice of P * 128 columns of a lane's two rows (g, g + 8): in each 128-column piece, 16 packed bytes per row
// (32 weights at 32 t) and the raw scale of the block holding them.
template <int P>
struct Slice {
  uint4 w[P][2];
  AbsRaw a[P][2];
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
        const float4 a4 = __ldg(reinterpret_cast<const float4*>(ap[h] + s * 4));  // blocks 4s .. 4s + 3
        d.a[0][h].v = t >> 1 ? a4.y : a4.x;
        d.a[P - 1][h].v = t >> 1 ? a4.w : a4.z;
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

// Piece product: 8 mma (two chains), each over 16 k of rows g and g + 8 with the pairs pre-scaled.
template <typename T>
__device__ __forceinline__ void multiply(const uint4 (&w)[2], const uint32_t (&sc)[2], const uint8_t* xe,
                                         const uint8_t* xo, uint32_t table, uint32_t lane4, float (&acc)[2][4]) {
  uint4 xv[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) xv[c] = *reinterpret_cast<const uint4*>((c & 1 ? xo : xe) + 16 * c);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t w0 = j == 0 ? w[0].x : j == 1 ? w[0].y : j == 2 ? w[0].z : w[0].w;
    const uint32_t w1 = j == 0 ? w[1].x : j == 1 ? w[1].y : j == 2 ? w[1].z : w[1].w;
    uint32_t a[4];
    a[0] = scale_pair<T>(lookup<0>(table, lane4, w0), sc[0]);
    a[1] = scale_pair<T>(lookup<0>(table, lane4, w1), sc[1]);
    a[2] = scale_pair<T>(lookup<1>(table, lane4, w0), sc[0]);
    a[3] = scale_pair<T>(lookup<1>(table, lane4, w1), sc[1]);
    mma16816<T>(acc[0], a, xv[j].x, xv[j].y);
    a[0] = scale_pair<T>(lookup<2>(table, lane4, w0), sc[0]);
    a[1] = scale_pair<T>(lookup<2>(table, lane4, w1), sc[1]);
    a[2] = scale_pair<T>(lookup<3>(table, lane4, w0), sc[0]);
    a[3] = scale_pair<T>(lookup<3>(table, lane4, w1), sc[1]);
    mma16816<T>(acc[1], a, xv[j].z, xv[j].w);
  }
}

__device__ __forceinline__ void group_sync(int group) {
  asm volatile("bar.sync %0, %1;" ::"r"(1 + group), "n"(32 * kWarpsK) : "memory");
}

// End of a tile: the group's 8 warps add their partial sums (buffer `red`), add the bias and store.
template <typename T>
__device__ __forceinline__ void finish(const GemvArgs& p, float* red, int group, int wk, int g, int t, int tile,
                                       float (&acc)[2][4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int tok = 2 * t + (c & 1), r = g + 8 * (c >> 1);
    if (tok < p.M) red[(wk * 16 + r) * 8 + tok] = acc[0][c] + acc[1][c];
    acc[0][c] = acc[1][c] = 0.f;
  }
  group_sync(group);
  const int j = threadIdx.x % (32 * kWarpsK), r = j % 16, tok = j / 16, n = tile * 16 + r;
  if (tok < p.M && n < p.N) {
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < kWarpsK; ++k) v += red[(k * 16 + r) * 8 + tok];
    if (p.bias) v += to_f32(static_cast<const T*>(p.bias)[n]);
    static_cast<T*>(p.out)[(int64_t)tok * p.N + n] = from_f32<T>(v);
  }
}

// Stages the pair table and x, then each group walks its tiles; per warp, slices are loaded kDepth ahead.
template <typename T, int kAbs, int P>
__global__ void __launch_bounds__(kThreads, 1) gemm4_gemv(GemvArgs p) {
  constexpr bool kPlain = kAbs != kAbsNested;
  constexpr int kDepth = P == 1 ? 4 : 2;  // slices loaded ahead per warp (as many as the registers hold)
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* table = smem;
  float* ncode = reinterpret_cast<float*>(smem + kTableBytes);
  float* red_all = ncode + 256;
  uint8_t* xs = reinterpret_cast<uint8_t*>(red_all + kGroups * kRedFloats);
  for (int i = threadIdx.x; i < 256 * 8; i += kThreads) {
    const uint32_t v = pack_pair<T>(__ldg(p.code + (i >> 7)), __ldg(p.code + ((i >> 3) & 15)));
    *reinterpret_cast<uint4*>(table + (i >> 3) * 256 + (i & 7) * 16) = make_uint4(v, v, v, v);
  }
  const int xunits = p.K / 8;
  for (int i = threadIdx.x; i < p.M * xunits; i += kThreads) {
    const int m = i / xunits, u = i % xunits;
    *reinterpret_cast<uint4*>(xs + m * p.xstride + x_unit(u) * 16) =
        __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + (int64_t)m * p.K) + u);
  }
  if (!kPlain && threadIdx.x < 256) ncode[threadIdx.x] = __ldg(p.am.nested_code + threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, group = warp / kWarpsK, wk = warp % kWarpsK;
  const int g = lane >> 2, t = lane & 3, groups = gridDim.x * kGroups;
  float* red = red_all + group * kRedFloats;
  const int first = blockIdx.x * kGroups + group, nslices = p.K / (128 * P);
  const int my_tiles = first < p.tiles ? (p.tiles - first + groups - 1) / groups : 0;
  Loader<kAbs, P> ld;
  ld.lo = wk * nslices / kWarpsK;
  ld.hi = (wk + 1) * nslices / kWarpsK;
  ld.s = ld.lo;
  ld.tile = first;
  const int items = my_tiles * (ld.hi - ld.lo);
  if (items > 0) ld.start(p, g, t);
  uint32_t lane4;
  asm("mov.b32 %0, %1;" : "=r"(lane4) : "r"(lane * 4));
  const uint32_t table_addr = static_cast<uint32_t>(__cvta_generic_to_shared(table));
  // this lane's x: units 4t + c of each slice, at x_unit(): +16 for even c and -16 for odd c where bit3 is set
  const uint8_t* xrow = xs + min(g, p.M - 1) * p.xstride + t * 64;
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
  float acc[2][4] = {};
  int s = ld.lo, tile = first, tiles_done = 0;
  for (int i = 0; i < items; i += kRing) {
#pragma unroll
    for (int d = 0; d < kRing; ++d) {
      if (i + d < items) {
        if (i + d + kDepth < items) {
          ld.load(p, t, buf[(d + kDepth) % kRing]);
          ld.next(p, groups, g, t);
        }
        const uint8_t* xsl = xrow + s * 256 * P;
#pragma unroll
        for (int q = 0; q < P; ++q) {
          uint32_t sc[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float v = kPlain ? buf[d].a[q][h].v : decode_abs(p.am, ncode, buf[d].a[q][h]);
            sc[h] = pack_pair<T>(v, v);
          }
          multiply<T>(buf[d].w[q], sc, xsl + 256 * q + flip, xsl + 256 * q - flip, table_addr, lane4, acc);
        }
        if (++s == ld.hi) {
          finish<T>(p, red + (tiles_done & 1) * (kRedFloats / 2), group, wk, g, t, tile, acc);
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
template <typename T, int kAbs, int P>
cudaError_t launch_gemv(GemvArgs p, int dev, size_t smem, int optin, cudaStream_t stream) {
  struct Entry {
    size_t smem;
    int per_sm;
  };
  static bool allowed[64] = {};
  static Entry cache[64][16] = {};
  cudaError_t err = allow_smem(gemm4_gemv<T, kAbs, P>, (size_t)optin, allowed);
  if (err != cudaSuccess) return err;
  Entry& e = cache[dev][(smem / 16) % 16];
  if (e.smem != smem || e.per_sm < 1) {
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemm4_gemv<T, kAbs, P>, kThreads, smem);
    if (err != cudaSuccess) return err;
    if (per_sm < 1) return cudaErrorNotSupported;
    e.per_sm = per_sm;
    e.smem = smem;
  }
  p.tiles = (p.N + 15) / 16;
  const int want = (p.tiles + kGroups - 1) / kGroups, res = e.per_sm * sm_count();
  gemm4_gemv<T, kAbs, P><<<want < res ? want : res, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Columns per slice = 128 * pieces: 2 (128 contiguous bytes per row and slice) where that divides K and still gives
// every warp a slice, else 1. Measured on an H200 at 8192x28672, M = 1: 61.6 us with 1 piece, 55.1 with 2; 4 pieces
// (55.7) leave registers for one slice in flight only.
inline int pieces_for(int K) { return K % 256 == 0 && K / 256 >= kWarpsK ? 2 : 1; }

template <typename T>
cudaError_t launch_pieces(const GemvArgs& p, bool plain4_ok, cudaStream_t stream) {
  static int optin[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  if (!optin[dev]) cudaDeviceGetAttribute(&optin[dev], cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const size_t smem = gemv_smem(p.M, p.K, (int)sizeof(T));
  if (smem > (size_t)optin[dev]) return cudaErrorNotSupported;
  const bool nested = p.am.plain == nullptr, two = pieces_for(p.K) == 2;
  if (nested) {
    return two ? launch_gemv<T, kAbsNested, 2>(p, dev, smem, optin[dev], stream)
               : launch_gemv<T, kAbsNested, 1>(p, dev, smem, optin[dev], stream);
  }
  if (two && plain4_ok) return launch_gemv<T, kAbsPlain4, 2>(p, dev, smem, optin[dev], stream);
  return two ? launch_gemv<T, kAbsPlain, 2>(p, dev, smem, optin[dev], stream)
             : launch_gemv<T, kAbsPlain, 1>(p, dev, smem, optin[dev], stream);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_gemm_4bit_tc. Returns cudaErrorNotSupported, launching nothing, unless: dtype fp16/bf16,
// 1 <= M <= 8, K % 128 == 0 and K >= 1024 (a slice for every warp), blocksize a power of two in [64, 1024] dividing
// K, x and w 16-byte aligned, and the staged x fitting in shared memory beside the 64 KB table.
SHARDQ_API int shardq_gemm_4bit_gemv(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                     const float* nested_absmax, const float* nested_code, float offset,
                                     const float* code, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                     int64_t blocksize, int dtype, void* stream_ptr) {
  const Gemm4Args a = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, M, N,
                                    K, blocksize);
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= 8 && N >= 1 && N <= INT32_MAX / 16 &&
                  K >= 128 * kWarpsK && K % 128 == 0 && K <= (1 << 20) && a.bs_shift >= 6 && a.bs_shift <= 10 &&
                  K % blocksize == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0 && a.am.given();
  if (!ok) return cudaErrorNotSupported;
  const GemvArgs p{a, 0, (int)K * 2 + 32};
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool plain4_ok = absmax != nullptr && a.bs_shift == 6 && (uintptr_t)absmax % 16 == 0;
  SHARDQ_DISPATCH_16(dtype, T, return launch_pieces<T>(p, plain4_ok, stream));
  return cudaErrorNotSupported;
}
