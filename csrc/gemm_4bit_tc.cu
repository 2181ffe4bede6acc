// 4-bit (nf4/fp4, optional double quant) matmul for decode-sized batches, M <= 32: out = x @ W.T + bias.
//
// Why this shape of kernel (measured on an H100 with ncu, bench/RESULTS.md): a GEMV over packed 4-bit weights is
// limited by bytes in flight (latency) or by instructions per weight byte (issue), never by arithmetic. So:
//   - weights and the x slice go global -> shared through an S-stage cp.async ring: S-1 chunks per CTA are always
//     in flight and hold no registers; each row's chunk is read as contiguous 64..1024-byte runs;
//   - the tensor cores do the multiply-adds with the operands swapped: the dequantized weights are the A operand
//     (16 output rows x 16 k) and x^T is B (16 k x 8 tokens), so one A fragment (the looked-up part) serves all
//     MT = ceil(M/8) token tiles;
//   - a byte becomes its two 16-bit codes with one shift, one LOP3 and one lookup in a 256-entry pair table kept
//     lane-private in shared memory (entry e of lane l in bank l: lookups never conflict);
//   - the four lanes that share an mma row read 16 weights each of one 64-weight quantization block, so an mma
//     sums inside one block and its absmax scales the fp32 partial sum once (no per-weight multiply);
//   - per-chunk bookkeeping (copy addresses, block scales) is amortized over KS 128-column slices per warp, and
//     each lane fetches one of the four block scales it needs and gets the others by warp shuffles.
// Inside an mma the k order is free as long as A and B agree per lane column t.
//
// Schedule: a CTA (8 warps) owns R = 16 * TM * (8 / WK) output rows per tile and walks K in chunks of
// KC = 128 * KS * WK columns; warp (wr, wk) computes its TM row tiles over its KS slices of each chunk, and the
// WK partial sums meet in shared memory when a tile ends. CTAs are persistent (grid = resident CTAs) and stride
// over tiles; the ring runs over the CTA's whole (tile, chunk) sequence, so the next tile's loads overlap this
// tile's tail. Shared-memory rows are XOR-swizzled so the fragment loads are conflict-free.
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kThreads = 256;

struct TcArgs : Gemm4Args {
  float* ws;  // parts > 1: fp32 [parts, M, N], each part's sums (sum_parts adds them in order), else null
  int tiles, nchunks, parts;  // a unit of work is (tile, part): the part's share of the tile's K chunks
};

// WK warps along K, TM row tiles of 16 per warp, KS 128-column slices per warp and chunk, MT token tiles of 8,
// S ring stages.
template <int WK, int TM, int KS, int MT, int S>
struct Cfg {
  static constexpr int WR = 8 / WK;                  // warps along rows
  static constexpr int R = 16 * WR * TM;             // rows per CTA tile
  static constexpr int KC = 128 * KS * WK;           // columns per chunk
  static constexpr int U = KC / 32;                  // 16-byte weight units per row and chunk
  static constexpr int XU = KC / 8;                  // 16-byte x units per row and chunk
  static constexpr int kStageW = R * KC / 2;         // weight bytes per stage
  static constexpr int kCopies = R * U / kThreads;   // weight copies per thread and chunk
  static constexpr int kXCopies = (8 * MT * XU + kThreads - 1) / kThreads;  // at most, per thread and chunk
  static constexpr int kRed = WK * R * 8 * MT;       // floats of the cross-warp reduction buffer
  static size_t smem(int M, int tsize) {
    return (size_t)(kPairTableWords + 256 + kRed) * 4 + (size_t)S * (kStageW + (size_t)M * KC * tsize);
  }
};

// Physical 16-byte unit of weight unit u in ring row r: the 32-byte slots of 4 consecutive rows are rotated so
// that a half-warp's 64-bit reads (rows g..g+3, 32 bytes each) cover all 32 banks.
__device__ __forceinline__ int w_unit(int r, int u) { return u ^ ((r & 3) << 1); }
// Physical 16-byte unit of x unit v in row m: rows of opposite parity read by one quarter-warp do not collide.
__device__ __forceinline__ int x_unit(int m, int v) { return v ^ (m & 1); }

// Walks a CTA's items in order: units (tile, part) strided over the grid, each unit its chunks [c0, c1).
template <bool kParts>
struct Cursor {
  int unit, tile, chunk, c1;
  __device__ __forceinline__ void begin(const TcArgs& p, int u) {
    unit = u;
    tile = u / p.parts;
    const int part = u - tile * p.parts;
    chunk = part * p.nchunks / p.parts;
    c1 = (part + 1) * p.nchunks / p.parts;
  }
  __device__ __forceinline__ void next(const TcArgs& p) {
    if (++chunk == c1) begin(p, unit + gridDim.x);
  }
  __device__ __forceinline__ int id() const { return unit; }
  __device__ __forceinline__ bool last(const TcArgs&) const { return chunk == c1 - 1; }
  __device__ __forceinline__ int part(const TcArgs& p) const { return unit - tile * p.parts; }
};

// One K part: a unit is a whole tile (two registers, no divisions: the instantiations that never split keep the
// registers and schedule they had before parts existed).
template <>
struct Cursor<false> {
  int tile, chunk;
  __device__ __forceinline__ void begin(const TcArgs&, int u) {
    tile = u;
    chunk = 0;
  }
  __device__ __forceinline__ void next(const TcArgs& p) {
    if (++chunk == p.nchunks) begin(p, tile + gridDim.x);
  }
  __device__ __forceinline__ int id() const { return tile; }
  __device__ __forceinline__ bool last(const TcArgs& p) const { return chunk == p.nchunks - 1; }
  __device__ __forceinline__ int part(const TcArgs&) const { return 0; }
};

// Per-thread copy plan: the 16-byte weight units this thread moves for every item (fixed rows and columns of
// the tile), their global addresses advanced chunk by chunk and re-based when the tile changes.
template <typename T, class C, bool kParts>
struct Feeder {
  const uint8_t* src[C::kCopies];
  bool row_ok[C::kCopies];
  int unit = -1;  // kParts: the unit src is walking (a unit may start at any chunk)

  __device__ __forceinline__ void start_unit(const TcArgs& p, int tile, int chunk) {
#pragma unroll
    for (int j = 0; j < C::kCopies; ++j) {
      const int i = threadIdx.x + j * kThreads, r = i / C::U, u = i % C::U, n = tile * C::R + r;
      row_ok[j] = n < p.N;
      src[j] = p.w + (int64_t)(row_ok[j] ? n : 0) * (p.K / 2) + (int64_t)chunk * (C::KC / 2) + u * 16;
    }
  }

  // Copy item `it` (weights and the x slice) into a ring stage; advances the weight addresses to the next chunk.
  __device__ __forceinline__ void issue(const TcArgs& p, Cursor<kParts> it, uint8_t* dst) {
    if (kParts ? it.id() != unit : it.chunk == 0) {
      start_unit(p, it.tile, it.chunk);
      if (kParts) unit = it.id();
    }
    const int k0 = it.chunk * C::KC, kc = min(C::KC, p.K - k0);
#pragma unroll
    for (int j = 0; j < C::kCopies; ++j) {
      const int i = threadIdx.x + j * kThreads, r = i / C::U, u = i % C::U;
      if (row_ok[j] && u * 32 < kc) cp_async16(dst + (r * C::U + w_unit(r, u)) * 16, src[j]);
      src[j] += C::KC / 2;
    }
    uint8_t* xdst = dst + C::kStageW;
    const T* x = static_cast<const T*>(p.x);
#pragma unroll
    for (int j = 0; j < C::kXCopies; ++j) {
      const int i = threadIdx.x + j * kThreads, m = i / C::XU, v = i % C::XU;
      if (m < p.M && v * 8 < kc) cp_async16(xdst + (m * C::XU + x_unit(m, v)) * 16, x + (m * p.K + k0 + v * 8));
    }
  }
};

// Per-warp state: its rows and columns, accumulators, and the next item's block scale (one per lane, slice and
// row tile: lane t holds row half t & 1, block t >> 1 of its row group; the others come by shuffle).
// Lane (g, t) reads, for each of the two 64-column blocks b of a 128-column slice, 8 bytes (16 weights) of rows
// g and g+8 of each row tile; the four lanes of a row together cover exactly one quantization block
// (blocksize >= 64), so each mma sums within one block.
template <typename T, int WK, int TM, int KS, int MT, int S>
struct Warp {
  using C = Cfg<WK, TM, KS, MT, S>;
  int wr, wk, g, t;
  float acc[TM][MT][4];
  AbsRaw abs[TM][KS];

  __device__ __forceinline__ int row(int i, int half) const { return wr * 16 * TM + 16 * i + g + 8 * half; }

  template <bool kParts>
  __device__ __forceinline__ void prefetch_abs(const TcArgs& p, Cursor<kParts> it) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        const int n = it.tile * C::R + row(i, t & 1), k = it.chunk * C::KC + (wk * KS + s) * 128 + (t >> 1) * 64;
        abs[i][s] = fetch_abs(p.am, p.bs_shift, n < p.N && k < p.K, (int64_t)n * p.K + k);
      }
  }

  // Slice s of the stage: the warp's 128 columns (wk * KS + s) for its TM row tiles. With MT == 1 both 64-column
  // blocks are in flight at once (two independent mma chains: the chain latency, not issue, limits small M).
  __device__ __forceinline__ void compute(const TcArgs& p, const uint8_t* stage, const uint32_t* table,
                                          uint32_t lane4, int s, const float (&sc)[TM][KS][2][2]) {
    constexpr int NB = MT == 1 ? 2 : 1;
#pragma unroll
    for (int b0 = 0; b0 < 2; b0 += NB) blocks<NB>(p, stage, table, lane4, s, b0, sc);
  }

  template <int NB>
  __device__ __forceinline__ void blocks(const TcArgs& p, const uint8_t* stage, const uint32_t* table,
                                         uint32_t lane4, int s, int b0, const float (&sc)[TM][KS][2][2]) {
    const uint8_t* xs = stage + C::kStageW;
    const int sl = wk * KS + s;
    uint4 xb[NB][MT][2];
#pragma unroll
    for (int bb = 0; bb < NB; ++bb)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = mt * 8 + g, v = sl * 16 + (b0 + bb) * 8 + t * 2;
#pragma unroll
        for (int e = 0; e < 2; ++e)
          xb[bb][mt][e] = m < p.M ? *reinterpret_cast<const uint4*>(xs + (m * C::XU + x_unit(m, v + e)) * 16)
                                  : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      uint2 wv[NB][2];
      float part[NB][MT][4];
#pragma unroll
      for (int bb = 0; bb < NB; ++bb) {
        const int u = sl * 4 + 2 * (b0 + bb) + (t >> 1);  // the 16-byte unit holding this lane's 8 bytes
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wv[bb][h] = *reinterpret_cast<const uint2*>(stage + (row(i, h) * C::U + w_unit(row(i, h), u)) * 16 +
                                                      (t & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int c = 0; c < 4; ++c) part[bb][mt][c] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int bb = 0; bb < NB; ++bb) {
          const uint32_t e0 = j < 2 ? wv[bb][0].x : wv[bb][0].y, e1 = j < 2 ? wv[bb][1].x : wv[bb][1].y;
          const int q = 2 * (j & 1);
          const uint32_t a[4] = {pair_lookup(table, lane4, e0, q), pair_lookup(table, lane4, e1, q),
                                 pair_lookup(table, lane4, e0, q + 1), pair_lookup(table, lane4, e1, q + 1)};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4& xv = xb[bb][mt][j >> 1];
            mma16816<T>(part[bb][mt], a, j & 1 ? xv.z : xv.x, j & 1 ? xv.w : xv.y);
          }
        }
#pragma unroll
      for (int bb = 0; bb < NB; ++bb)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            acc[i][mt][c] = fmaf(part[bb][mt][c], sc[i][s][c >> 1][b0 + bb], acc[i][mt][c]);
    }
  }

  // End of a unit: the WK warps of each row group add their partial sums in shared memory; bias; store (or, with
  // K split in parts, store the part's sums to ws).
  template <bool kParts>
  __device__ __forceinline__ void finish(const TcArgs& p, float* red, int n0, int part) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          red[(wk * C::R + row(i, c >> 1)) * 8 * MT + mt * 8 + 2 * t + (c & 1)] = acc[i][mt][c];
          acc[i][mt][c] = 0.f;
        }
    __syncthreads();
    for (int j = threadIdx.x; j < C::R * p.M; j += kThreads) {
      const int r = j % C::R, m = j / C::R, n = n0 + r;
      if (n < p.N) {
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < WK; ++k) v += red[(k * C::R + r) * 8 * MT + m];
        if (kParts && p.parts > 1) {
          p.ws[((int64_t)part * p.M + m) * p.N + n] = v;
        } else {
          if (p.bias) v += to_f32(static_cast<const T*>(p.bias)[n]);
          static_cast<T*>(p.out)[(int64_t)m * p.N + n] = from_f32<T>(v);
        }
      }
    }
  }
};

// This CTA's items (chunks over all its units).
template <bool kParts>
__device__ __forceinline__ int cta_items(const TcArgs& p) {
  if (!kParts) return (p.tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x * p.nchunks;
  int items = 0;
  for (int u = blockIdx.x; u < p.tiles * p.parts; u += gridDim.x) {
    const int part = u % p.parts;
    items += (part + 1) * p.nchunks / p.parts - part * p.nchunks / p.parts;
  }
  return items;
}

// Ring over the CTA's items: wait for item c (at most S-2 newer groups pending), sync (c is visible, the slot
// of item c-1 is free), refill that slot with item c+S-1, compute c. One group is committed per iteration
// (possibly empty) so group counts track item indices.
template <typename T, int WK, int TM, int KS, int MT, int S, bool kParts>
__global__ void __launch_bounds__(kThreads, TM * MT * KS == 1 ? 3 : TM * MT <= 2 ? 2 : 1) gemm4_tc(TcArgs p) {
  using C = Cfg<WK, TM, KS, MT, S>;
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float* ncode = reinterpret_cast<float*>(smem) + kPairTableWords;
  float* red = ncode + 256;
  uint8_t* ring = reinterpret_cast<uint8_t*>(red + C::kRed);
  const int stage = C::kStageW + p.M * C::KC * (int)sizeof(T);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Warp<T, WK, TM, KS, MT, S> w;
  w.wr = warp / WK;
  w.wk = warp % WK;
  w.g = lane >> 2;
  w.t = lane & 3;
  const int items = cta_items<kParts>(p);
  Cursor<kParts> in, cur;
  in.begin(p, blockIdx.x);
  cur.begin(p, blockIdx.x);
  Feeder<T, C, kParts> feed;
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < items) feed.issue(p, in, ring + st * stage);
    in.next(p);
    cp_async_commit();
  }
  fill_pair_table<T, kThreads>(table, p.code);
  if (!p.am.plain) ncode[threadIdx.x] = __ldg(p.am.nested_code + threadIdx.x);  // 256 threads = 256 entries
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) w.acc[i][mt][c] = 0.f;
  w.prefetch_abs(p, cur);
  uint32_t lane4;
  asm("mov.b32 %0, %1;" : "=r"(lane4) : "r"(lane * 4));  // opaque: keeps the lookup's mask-and-or one LOP3
  for (int c = 0; c < items; ++c) {
    cp_async_wait<S - 2>();
    __syncthreads();
    if (c + S - 1 < items) feed.issue(p, in, ring + ((c + S - 1) % S) * stage);
    in.next(p);
    cp_async_commit();
    float sc[TM][KS][2][2];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int s = 0; s < KS; ++s) {
        const float own = decode_abs(p.am, ncode, w.abs[i][s]);
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int b = 0; b < 2; ++b) sc[i][s][h][b] = __shfl_sync(0xffffffffu, own, (lane & ~3) | (b << 1) | h);
      }
    const Cursor<kParts> now = cur;
    cur.next(p);
    if (c + 1 < items) w.prefetch_abs(p, cur);
#pragma unroll
    for (int s = 0; s < KS; ++s)
      if (now.chunk * C::KC + (w.wk * KS + s) * 128 < p.K)
        w.compute(p, ring + (c % S) * stage, table, lane4, s, sc);
    if (now.last(p)) w.template finish<kParts>(p, red, now.tile * C::R, now.part(p));
  }
  cp_async_wait<0>();
}

constexpr int kMaxParts = 4;  // ws holds kMaxParts * M * N floats

// Parts to split K into where the row tiles alone leave SMs idle: the fewest that minimize the time in units of
// one tile's whole K, ceil(tiles * parts / resident) / parts (each part at least one chunk).
inline int split_parts(int tiles, int nchunks, int resident) {
  const auto waves = [&](int s) { return (int64_t)(((int64_t)tiles * s + resident - 1) / resident); };
  int best = 1;
  for (int s = 2; s <= kMaxParts && s <= nchunks; ++s)
    if (waves(s) * best < waves(best) * s) best = s;
  return best;
}

// Launch one instantiation as a persistent grid (resident CTAs, capped by the number of units); with ws, K split
// in parts (split_parts) and a second launch adding them.
template <typename T, int WK, int TM, int KS, int MT, int S, bool kParts>
cudaError_t launch_tc(TcArgs p, cudaStream_t stream) {
  using C = Cfg<WK, TM, KS, MT, S>;
  const auto kernel = gemm4_tc<T, WK, TM, KS, MT, S, kParts>;
  static int resident[64][33] = {};  // resident CTAs per (device, M); the shared-memory opt-in is per device
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  const size_t smem = C::smem(p.M, (int)sizeof(T));
  int& res = resident[dev][p.M];
  if (!res) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)C::smem(8 * MT, (int)sizeof(T)));
    if (err != cudaSuccess) return err;
    int sms = 0, per_sm = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (err != cudaSuccess) return err;
    res = (per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  }
  p.tiles = (p.N + C::R - 1) / C::R;
  p.nchunks = (p.K + C::KC - 1) / C::KC;
  p.parts = kParts ? split_parts(p.tiles, p.nchunks, res) : 1;
  const int units = p.tiles * p.parts, grid = units < res ? units : res;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.parts == 1) return err;
  return launch_sum_parts<T>(p.ws, p.parts, p.bias, p.out, p.M, p.N, stream);
}

template <typename T>
cudaError_t dispatch_tc(const TcArgs& p, cudaStream_t stream) {
  // Measured alternatives (bench/RESULTS.md): one slice per chunk at 3 CTAs/SM for M <= 2 (81 vs 65 us at
  // 8192x28672), and 32/64-row tiles for M <= 16/32 (108/145 vs 89/112 us) were slower.
  if (p.M <= 2) return launch_tc<T, 8, 1, 2, 1, 3, false>(p, stream);
  if (p.M <= 8) return launch_tc<T, 8, 1, 1, 1, 3, false>(p, stream);
  // M > 8 takes 64- and 128-row tiles (x staging limits the CTAs per SM): with fewer tiles than SMs and no ws,
  // refuse (the caller retries with ws, where K is split in parts).
  const bool narrow = (p.N + (p.M <= 16 ? 63 : 127)) / (p.M <= 16 ? 64 : 128) < sm_count();
  if (narrow && !p.ws) return cudaErrorNotSupported;
  if (p.M <= 16) {
    return p.ws ? launch_tc<T, 4, 2, 1, 2, 3, true>(p, stream) : launch_tc<T, 4, 2, 1, 2, 3, false>(p, stream);
  }
  return p.ws ? launch_tc<T, 2, 2, 1, 4, 3, true>(p, stream) : launch_tc<T, 2, 2, 1, 4, 3, false>(p, stream);
}

// Checks the preconditions shared by both entry points (on the 64-bit sizes, before narrowing) and launches.
inline int tc_entry(const void* x, const void* w, const float* absmax, const void* absmax_q,
                    const float* nested_absmax, const float* nested_code, float offset, const float* code,
                    const void* bias, void* out, float* ws, int64_t M, int64_t N, int64_t K, int64_t blocksize,
                    int dtype, cudaStream_t stream) {
  const Gemm4Args a = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, M, N,
                                    K, blocksize);
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= 32 && N >= 1 && N <= INT32_MAX / 2 / kMaxParts &&
                  K >= 128 && M * K <= INT32_MAX && K % 128 == 0 && a.bs_shift >= 6 && (uintptr_t)x % 16 == 0 &&
                  (uintptr_t)w % 16 == 0 && a.am.given();
  if (!ok) return cudaErrorNotSupported;
  const TcArgs p{a, ws, 0, 0, 1};
  SHARDQ_DISPATCH_16(dtype, T, return dispatch_tc<T>(p, stream));
  return cudaErrorNotSupported;
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_gemm_4bit_small. Returns cudaErrorNotSupported, launching nothing, unless: dtype
// fp16/bf16, 1 <= M <= 32, K % 128 == 0, blocksize a power of two >= 64, x and w 16-byte aligned, and for M > 8
// at least as many row tiles as SMs (else shardq_gemm_4bit_tc_split takes the shape).
SHARDQ_API int shardq_gemm_4bit_tc(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                   const float* nested_absmax, const float* nested_code, float offset,
                                   const float* code, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                   int64_t blocksize, int dtype, void* stream_ptr) {
  return tc_entry(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, nullptr, M, N, K,
                  blocksize, dtype, static_cast<cudaStream_t>(stream_ptr));
}

// The same kernel with K split in up to 4 parts where the row tiles alone leave SMs idle (e.g. N = 4096 or 11008
// at 17 <= M <= 32): ws is fp32 scratch of 4 * M * N floats the parts' sums go to, and a second launch adds them in
// order (deterministic) with the bias. Same preconditions as shardq_gemm_4bit_tc, without the one on row tiles.
SHARDQ_API int shardq_gemm_4bit_tc_split(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                         const float* nested_absmax, const float* nested_code, float offset,
                                         const float* code, const void* bias, void* out, void* ws, int64_t M,
                                         int64_t N, int64_t K, int64_t blocksize, int dtype, void* stream_ptr) {
  if (ws == nullptr) return cudaErrorNotSupported;
  return tc_entry(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out,
                  static_cast<float*>(ws), M, N, K, blocksize, dtype, static_cast<cudaStream_t>(stream_ptr));
}
