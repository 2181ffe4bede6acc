// Grouped 4-bit (nf4/fp4, optional double quant) matmul for MoE experts, one launch for all experts:
// out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ W_e.T, W_e expert e's [N, K] weight, stored per expert
// as gemm_4bit stores one layer (flattened packed bytes, absmax per block, its own code table).
//
// Why this shape: at decode and small prefill every expert sees few rows (Mixtral top-2: 1 and 16 tokens give at
// most 16 rows per expert), so the work is reading each hit expert's packed weights once, as in gemm_4bit_gemv.cu:
//   - a unit of work is (hit expert, 16-feature tile); the CTA (8 warps) splits K over its warps, each lane reading
//     16 packed bytes (32 weights) of rows g and g + 8 per 128-column piece with one 128-bit load, kBatch pieces in
//     flight before any is multiplied; the 8 partial sums meet in shared memory;
//   - the dequantized weights are the A operand of mma.m16n8k16 (fp32 accumulation), the expert's token rows (x read
//     from global memory, L1/L2-resident: it is small and every tile of the expert reads it) the B operand, 8 tokens
//     per fragment; each looked-up A fragment serves up to 4 token fragments;
//   - a byte becomes its two 16-bit code values with one shift/LOP3 and one LDS from the lane-private pair table of
//     common.cuh (built per CTA from the expert's code table, rebuilt only when the CTA's expert changes), scaled
//     by its block's absmax (one HMUL2, in the activation dtype) before the mma;
//   - units enumerate the hit experts only (read from offsets on the device, no host sync: CUDA graphs can capture
//     it), so experts without rows are never read; persistent CTAs stride over the units, expert-major.
// Rows are processed in passes of at most 32 tokens per unit (a pass re-reads the tile's weights, mostly from L2);
// large per-expert row counts are better served by the per-expert kernels, which cuda_ops.py routes to eagerly.
// Inside an mma the k order is free as long as A and B agree per lane column t: lane t's four k slots of mma j are
// the weights 32t + 4j .. 32t + 4j + 3 of the piece, the same columns of x.
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kWarps = 8;             // warps per CTA, along K
constexpr int kThreads = 32 * kWarps;
constexpr int kTileRows = 16;         // output features per unit (one mma A tile)
constexpr int kPassTokens = 32;       // token rows per pass over a tile's weights (4 fragments of 8)
constexpr int kBatch = 4;             // 128-column pieces a warp loads before multiplying them
constexpr int kMaxExperts = 256;
constexpr int kRedStride = kPassTokens + 1;  // floats per (warp, row) of the reduction buffer (padded: fewer conflicts)
constexpr size_t kSmem = (size_t)kPairTableWords * 4 + (size_t)kWarps * kTileRows * kRedStride * 4 +
                         (size_t)(kMaxExperts + 1) * 4;

struct GroupedArgs {
  const void* x;              // [T, K]
  const int32_t* offsets;     // [E + 1]
  const uint8_t* w;           // [E, N * K / 2]
  const float* absmax;        // plain: fp32 [E, nb]; null with double quant
  const uint8_t* absmax_q;    // double quant: 8-bit codes [E, nb]
  const float* nested_absmax; // double quant: [E, nn]
  const float* nested_code;   // double quant: [E, 256]
  const float* nested_offset; // double quant: [E]
  const float* code;          // [E, 16]
  void* out;                  // [T, N]
  int T, E, N, K, bs_shift, ntiles;
  int64_t nb, nn;             // blocks and nested blocks per expert
};

// Expert e's scales: the block absmax of a flattened element index, plain or decoded from double quant.
struct ExpertScale {
  const float* plain;
  const uint8_t* q;
  const float* nabs;
  const float* ncode;
  float offset;
  __device__ __forceinline__ float get(int64_t blk) const {
    if (plain) return __ldg(plain + blk);
    return __ldg(ncode + __ldg(q + blk)) * __ldg(nabs + (blk >> 8)) + offset;
  }
};

__device__ __forceinline__ ExpertScale expert_scale(const GroupedArgs& p, int e) {
  if (p.absmax) return {p.absmax + e * p.nb, nullptr, nullptr, nullptr, 0.f};
  return {nullptr, p.absmax_q + e * p.nb, p.nested_absmax + e * p.nn, p.nested_code + e * 256,
          __ldg(p.nested_offset + e)};
}

// 16 packed bytes read once: not kept in L1, L2 fetching the surrounding 256 bytes (as gemm_4bit_gemv.cu).
__device__ __forceinline__ uint4 load_weights(const uint8_t* src) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(src));
  return v;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// One 128-column piece of rows g and g + 8 (w[0], w[1], scales sc) times NT token fragments; xp[f]: this lane's 32
// columns of token g + 8f (null past the pass's tokens: zeros).
template <typename T, int NT>
__device__ __forceinline__ void multiply(const uint4 (&w)[2], const uint32_t (&sc)[2], const T* const (&xp)[NT],
                                         const uint32_t* table, uint32_t lane4, float (&acc)[NT][2][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint4 xv[NT];
#pragma unroll
    for (int f = 0; f < NT; ++f)
      xv[f] = xp[f] ? __ldg(reinterpret_cast<const uint4*>(xp[f]) + j) : make_uint4(0, 0, 0, 0);
    const uint32_t w0 = word(w[0], j), w1 = word(w[1], j);
    uint32_t a[4];
    a[0] = scale_pair<T>(pair_lookup(table, lane4, w0, 0), sc[0]);
    a[1] = scale_pair<T>(pair_lookup(table, lane4, w1, 0), sc[1]);
    a[2] = scale_pair<T>(pair_lookup(table, lane4, w0, 1), sc[0]);
    a[3] = scale_pair<T>(pair_lookup(table, lane4, w1, 1), sc[1]);
#pragma unroll
    for (int f = 0; f < NT; ++f) mma16816<T>(acc[f][0], a, xv[f].x, xv[f].y);
    a[0] = scale_pair<T>(pair_lookup(table, lane4, w0, 2), sc[0]);
    a[1] = scale_pair<T>(pair_lookup(table, lane4, w1, 2), sc[1]);
    a[2] = scale_pair<T>(pair_lookup(table, lane4, w0, 3), sc[0]);
    a[3] = scale_pair<T>(pair_lookup(table, lane4, w1, 3), sc[1]);
#pragma unroll
    for (int f = 0; f < NT; ++f) mma16816<T>(acc[f][1], a, xv[f].z, xv[f].w);
  }
}

// Where a unit's pass stands: the expert's weights and scales, the tile's first feature, the pass's token rows.
struct Pass {
  const uint8_t* w;  // expert's packed weights
  ExpertScale scale;
  int n0, m0, mc;    // first feature of the tile; first row and row count of the pass
};

// The pieces [lo, hi) of this warp for one pass of NT token fragments, accumulated into acc.
template <typename T, int NT>
__device__ __forceinline__ void walk(const GroupedArgs& p, const Pass& u, const uint32_t* table, uint32_t lane4,
                                     int lo, int hi, float (&acc)[NT][2][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  int64_t row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) row[h] = min(u.n0 + g + 8 * h, p.N - 1);  // rows past N: loaded, never stored
  const T* xrow[NT];
#pragma unroll
  for (int f = 0; f < NT; ++f) {
    const int tok = 8 * f + g;
    xrow[f] = tok < u.mc ? static_cast<const T*>(p.x) + (int64_t)(u.m0 + tok) * p.K + 32 * t : nullptr;
  }
  for (int p0 = lo; p0 < hi; p0 += kBatch) {
    uint4 wv[kBatch][2];
    uint32_t sc[kBatch][2];
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int piece = min(p0 + b, hi - 1);  // a batch past hi reloads the last piece (not multiplied)
        wv[b][h] = load_weights(u.w + row[h] * (p.K / 2) + piece * 64 + t * 16);
        const float s = u.scale.get((row[h] * p.K + piece * 128 + t * 32) >> p.bs_shift);
        sc[b][h] = pack_pair<T>(s, s);
      }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (p0 + b < hi) {
        const T* xp[NT];
#pragma unroll
        for (int f = 0; f < NT; ++f) xp[f] = xrow[f] ? xrow[f] + (p0 + b) * 128 : nullptr;
        multiply<T, NT>(wv[b], sc[b], xp, table, lane4, acc);
      }
    }
  }
}

// One pass: every warp its share of K, then the 8 partial sums added in warp order and stored as T.
template <typename T, int NT>
__device__ __forceinline__ void run_pass(const GroupedArgs& p, const Pass& u, const uint32_t* table, uint32_t lane4,
                                         float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int pieces = p.K / 128, lo = warp * pieces / kWarps, hi = (warp + 1) * pieces / kWarps;
  float acc[NT][2][4] = {};
  walk<T, NT>(p, u, table, lane4, lo, hi, acc);
#pragma unroll
  for (int f = 0; f < NT; ++f)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int tok = 8 * f + 2 * t + (c & 1), r = g + 8 * (c >> 1);
      red[(warp * kTileRows + r) * kRedStride + tok] = acc[f][0][c] + acc[f][1][c];
    }
  __syncthreads();
  for (int j = threadIdx.x; j < kTileRows * u.mc; j += kThreads) {
    const int r = j % kTileRows, tok = j / kTileRows, n = u.n0 + r;
    if (n < p.N) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < kWarps; ++k) v += red[(k * kTileRows + r) * kRedStride + tok];
      static_cast<T*>(p.out)[(int64_t)(u.m0 + tok) * p.N + n] = from_f32<T>(v);
    }
  }
  __syncthreads();
}

// The hit experts (rows > 0) in order, from offsets; returns how many.
__device__ __forceinline__ int list_hit(const GroupedArgs& p, int* hit) {
  if (threadIdx.x == 0) {
    int h = 0;
    for (int e = 0; e < p.E; ++e)
      if (min(__ldg(p.offsets + e + 1), p.T) > max(__ldg(p.offsets + e), 0)) hit[h++] = e;
    hit[kMaxExperts] = h;
  }
  __syncthreads();
  return hit[kMaxExperts];
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) grouped_gemm4(GroupedArgs p) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float* red = reinterpret_cast<float*>(table + kPairTableWords);
  int* hit = reinterpret_cast<int*>(red + kWarps * kTileRows * kRedStride);
  const int units = list_hit(p, hit) * p.ntiles;
  uint32_t lane4;
  asm("mov.b32 %0, %1;" : "=r"(lane4) : "r"((threadIdx.x & 31) * 4));
  int table_expert = -1;
  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int e = hit[unit / p.ntiles];
    if (e != table_expert) {  // uniform over the CTA: every thread walks the same units
      __syncthreads();
      fill_pair_table<T, kThreads>(table, p.code + e * 16);
      __syncthreads();
      table_expert = e;
    }
    const int r0 = max(__ldg(p.offsets + e), 0), r1 = min(__ldg(p.offsets + e + 1), p.T);
    Pass u{p.w + e * ((int64_t)p.N * p.K / 2), expert_scale(p, e), (unit % p.ntiles) * kTileRows, 0, 0};
    for (u.m0 = r0; u.m0 < r1; u.m0 += kPassTokens) {
      u.mc = min(kPassTokens, r1 - u.m0);
      if (u.mc <= 8) {
        run_pass<T, 1>(p, u, table, lane4, red);
      } else if (u.mc <= 16) {
        run_pass<T, 2>(p, u, table, lane4, red);
      } else {
        run_pass<T, 4>(p, u, table, lane4, red);
      }
    }
  }
}

// Persistent grid: resident CTAs (queried once per device), at most one per (expert, tile).
template <typename T>
cudaError_t launch(GroupedArgs p, cudaStream_t stream) {
  static bool allowed[64] = {};
  static int per_sm[64] = {};
  int dev = 0, optin = 0;
  cudaError_t err = smem_optin(dev, optin);
  if (err != cudaSuccess) return err;
  if (kSmem > (size_t)optin) return cudaErrorNotSupported;
  err = allow_smem(grouped_gemm4<T>, kSmem, allowed);
  if (err != cudaSuccess) return err;
  if (per_sm[dev] < 1) {
    int n = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, grouped_gemm4<T>, kThreads, kSmem);
    if (err != cudaSuccess) return err;
    if (n < 1) return cudaErrorNotSupported;
    per_sm[dev] = n;
  }
  const int64_t want = (int64_t)p.E * p.ntiles, res = (int64_t)per_sm[dev] * sm_count();
  grouped_gemm4<T><<<(unsigned)(want < res ? want : res), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// out [T, N] (dtype of x) = rows offsets[e]:offsets[e+1] of x [T, K] times expert e's dequantized weight, for the
// E experts of w (uint8 [E, N * K / 2]), absmax (fp32 [E, N * K / blocksize]) or double quant (absmax_q uint8 [E,
// nb], nested_absmax fp32 [E, ceil(nb / 256)], nested_code fp32 [E, 256], nested_offset fp32 [E]), code fp32
// [E, 16]; offsets int32 [E + 1], rising from 0 to T (rows outside every expert are not written). Returns
// cudaErrorNotSupported, launching nothing, unless: dtype fp16/bf16, 1 <= T, 1 <= E <= 256, N >= 1,
// K % 128 == 0, blocksize a power of two >= 32, x and w 16-byte aligned, every pointer of one scale form given.
SHARDQ_API int shardq_grouped_gemm_4bit(const void* x, const void* offsets, const void* w, const float* absmax,
                                        const void* absmax_q, const float* nested_absmax, const float* nested_code,
                                        const float* nested_offset, const float* code, void* out, int64_t T,
                                        int64_t E, int64_t N, int64_t K, int64_t blocksize, int dtype,
                                        void* stream_ptr) {
  const int bs_shift = log2_exact(blocksize);
  const bool scales = absmax != nullptr || (absmax_q && nested_absmax && nested_code && nested_offset);
  const bool ok = (dtype == kF16 || dtype == kBF16) && T >= 1 && T <= INT32_MAX && E >= 1 && E <= kMaxExperts &&
                  N >= 1 && N <= INT32_MAX / 16 && K >= 128 && K % 128 == 0 && K <= (1 << 20) && bs_shift >= 5 &&
                  x && w && code && out && offsets && scales && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0;
  if (!ok) return cudaErrorNotSupported;
  const int64_t nb = (N * K + blocksize - 1) >> bs_shift;
  GroupedArgs p{x, static_cast<const int32_t*>(offsets), static_cast<const uint8_t*>(w), absmax,
                static_cast<const uint8_t*>(absmax_q), nested_absmax, nested_code, nested_offset, code, out,
                (int)T, (int)E, (int)N, (int)K, bs_shift, (int)((N + kTileRows - 1) / kTileRows), nb, (nb + 255) / 256};
  SHARDQ_DISPATCH_16(dtype, TT, { return launch<TT>(p, static_cast<cudaStream_t>(stream_ptr)); });
  return cudaErrorNotSupported;
}
