// 4-bit (nf4/fp4, optional double quant) GEMV for M <= 8 with deep cp.async staging: out = x @ W.T + bias.
// Status: candidate (variant 3 of the small-M path, SHARDQ_GEMM4_VARIANT=3), not yet measured.
//
// Hypothesis under test: variants 1/2 (gemm_4bit_small.cu) keep only a few KB of loads in flight per warp in
// registers and drain them per row group; at ~3 TB/s and ~1-1.5 us loaded DRAM latency an SM needs >= 25-35 KB
// in flight continuously (Little's law). Here the weights are copied global -> shared with 16-byte
// cp.async.cg (no registers held) in an S-stage ring, so S-1 chunks are always in flight per CTA.
//
// Schedule: a CTA of 256 threads (8 warps) owns R = 16 consecutive output rows and walks K in chunks of KC = 1024
// columns (512 contiguous bytes per row). Stage = 16 rows x 512 B of weights (8 KB) + x[M, KC] (M x 2 KB).
// Warp w computes rows 2w and 2w+1 together (sharing the activations it reads); lane l takes the 16-byte word l
// of each row's chunk (32 codes = columns 32l..32l+31, inside one quantization block because blocksize >= 32
// divides K), looks codes up in a 16-entry fp32 table in shared memory (16 distinct banks: conflict-free),
// multiplies by x in fp32, scales by the block's absmax once per word and accumulates in fp32. The lanes'
// partial sums are reduced with __shfl_xor_sync; lane 0 adds the bias and writes in x's dtype.
// The absmax of the next chunk is fetched into registers while the current chunk is computed (double quant:
// the uint8 code and the nested absmax from global, the 256-entry nested code table from shared memory).
//
// Occupancy (H100: 228 KB shared memory, 64 K registers, 2048 threads per SM):
//   smem per CTA = S * (R * KC/2 + M * KC * 2) + (16 + 256) * 4 = 32 KB + M * 8 KB + 1 KB
//                = 41 KB (M=1), 49 KB (M=2), 65 KB (M=4), 97 KB (M=8)  (+1 KB reserved per CTA)
//   -> smem allows 5 (M=1), 4 (M=2), 3 (M=4), 2 (M=8) CTAs/SM. __launch_bounds__(256, MT <= 2 ? 4 : 2):
//      ptxas (nvcc 13.0, sm_80/sm_90, no spills) uses 64 (M=1), 60 (M=2), ~78 (M<=4), ~91 (M<=8) registers
//      -> 4, 4, 3, 2 CTAs/SM (registers: 65536 / (256 * regs)), i.e. 32, 32, 24, 16 warps/SM.
//   weights in flight per CTA: (S-1) * 8 KB = 24 KB -> 96 KB/SM at M <= 2, 72 KB at M <= 4, 48 KB at M <= 8
//   (>= 32 KB/SM as Little's law asks), plus the x slices (L2 hits).
// Grid: ceil(N / R) CTAs (1792 for N = 28672), no persistence.
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kThreads = 256;                // 8 warps
constexpr int kRows = 16;                   // R: output rows per CTA (2 per warp)
constexpr int kChunk = 1024;                // KC: columns per chunk
constexpr int kChunkBytes = kChunk / 2;     // packed bytes per row per chunk (= 32 lanes x 16 B)
constexpr int kStages = 4;                  // S: ring depth; S-1 chunks in flight
constexpr int kStageWBytes = kRows * kChunkBytes;

struct StagedArgs {
  const void* x;
  const uint8_t* w;
  Absmax am;  // plain fp32, or double quant (nested_code is read from its shared-memory copy)
  const float* code;
  const void* bias;
  void* out;
  int M, N, K, bs_shift;
};

// Shared-memory layout of one CTA (dynamic): weight ring, x ring, code table, nested code table.
struct Smem {
  uint8_t* w;     // [S][R][KC/2]
  uint8_t* x;     // [S][M][KC] elements of T (byte-addressed)
  float* code;    // [16]
  float* ncode;   // [256]
  __device__ __forceinline__ Smem(uint8_t* base, int M, int tsize) {
    w = base;
    x = w + kStages * kStageWBytes;
    code = reinterpret_cast<float*>(x + (size_t)kStages * M * kChunk * tsize);
    ncode = code + 16;
  }
};

inline size_t smem_bytes(int M, int tsize) {
  return (size_t)kStages * kStageWBytes + (size_t)kStages * M * kChunk * tsize + (16 + 256) * sizeof(float);
}

// Stage 1 (copy): issue the 16-byte cp.async copies of chunk c (weights of the CTA's rows + x slice) into ring
// slot `slot`. Rows past N and columns past K are not copied (their slots are never read for output).
template <typename T>
__device__ __forceinline__ void issue_chunk(const StagedArgs& p, const Smem& s, int n0, int c, int slot) {
  const int k0 = c * kChunk;
  const int kc = min(kChunk, p.K - k0);          // multiple of 64: whole 32-byte pieces per row
  const int wwords = kc / 32;                    // 16-byte words per row in this chunk (<= 32)
  const int64_t row_bytes = p.K / 2;
  uint8_t* wdst = s.w + slot * kStageWBytes;
  for (int i = threadIdx.x; i < kRows * 32; i += kThreads) {
    const int r = i >> 5, j = i & 31, n = n0 + r;
    if (n < p.N && j < wwords)
      cp_async16(wdst + r * kChunkBytes + j * 16, p.w + (int64_t)n * row_bytes + k0 / 2 + j * 16);
  }
  const int xwords = kc * (int)sizeof(T) / 16;   // 16-byte words of one x row slice (<= 128)
  const int xrow = kChunk * (int)sizeof(T);      // bytes of one x row slot
  uint8_t* xdst = s.x + (size_t)slot * p.M * xrow;
  const uint8_t* xsrc = static_cast<const uint8_t*>(p.x);
  for (int i = threadIdx.x; i < p.M * (kChunk * (int)sizeof(T) / 16); i += kThreads) {
    const int m = i / (xrow / 16), j = i % (xrow / 16);
    if (j < xwords)
      cp_async16(xdst + m * xrow + j * 16, xsrc + ((int64_t)m * p.K + k0) * sizeof(T) + j * 16);
  }
}

// Raw absmax of the block holding columns 32*lane.. of row n in chunk c, fetched one chunk ahead; decoded later.
struct AbsRaw {
  float v;       // plain absmax, or nested absmax with double quant
  uint32_t q;    // double-quant code
};

__device__ __forceinline__ AbsRaw fetch_abs(const StagedArgs& p, int n, int c, int lane) {
  AbsRaw r{0.f, 0u};
  const int k = c * kChunk + lane * 32;
  if (n < p.N && k < p.K) {
    const int64_t blk = ((int64_t)n * p.K + k) >> p.bs_shift;
    if (p.am.plain) {
      r.v = __ldg(p.am.plain + blk);
    } else {
      r.q = __ldg(p.am.q + blk);
      r.v = __ldg(p.am.nested_absmax + (blk >> 8));
    }
  }
  return r;
}

__device__ __forceinline__ float decode_abs(const StagedArgs& p, const Smem& s, AbsRaw r) {
  return p.am.plain ? r.v : s.ncode[r.q] * r.v + p.am.offset;
}

template <typename T> __device__ __forceinline__ float2 pair_to_f32(uint32_t v);
template <> __device__ __forceinline__ float2 pair_to_f32<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
template <> __device__ __forceinline__ float2 pair_to_f32<__nv_bfloat16>(uint32_t v) {
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));  // exact bf16 -> fp32
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int q) {
  return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
}

// Stage 2 (compute): this warp's two rows of chunk c from ring slot `slot` into acc[row][m].
// Lane l's 32 columns are read as 4 pieces of 8; the piece order is rotated by lane so that the 8 lanes of a
// 128-bit shared-memory phase hit 8 distinct 16-byte bank groups of x (stride between lanes is 64 B).
template <typename T, int MT>
__device__ __forceinline__ void compute_chunk(const StagedArgs& p, const Smem& s, int slot, int c, int warp,
                                              int lane, const float (&scale)[2], float (&acc)[2][MT]) {
  const int kc = min(kChunk, p.K - c * kChunk);
  if (lane * 32 >= kc) return;  // past the end of the last chunk
  const uint8_t* wrow = s.w + slot * kStageWBytes + (2 * warp) * kChunkBytes + lane * 16;
  const uint4 w0 = *reinterpret_cast<const uint4*>(wrow);
  const uint4 w1 = *reinterpret_cast<const uint4*>(wrow + kChunkBytes);
  const int xrow = kChunk * (int)sizeof(T);
  const uint8_t* xs = s.x + (size_t)slot * p.M * xrow + lane * 32 * sizeof(T);
  float part[2][MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) part[0][m] = part[1][m] = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int piece = (q + (lane >> 1)) & 3;  // columns 8*piece.. of the lane's 32 = bytes 4*piece.. of its word
    const uint32_t u0 = word_of(w0, piece), u1 = word_of(w1, piece);
    float f0[8], f1[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // byte j of the word: high nibble = column 2j, low nibble = column 2j+1
      f0[2 * j] = s.code[(u0 >> (8 * j + 4)) & 15];
      f0[2 * j + 1] = s.code[(u0 >> (8 * j)) & 15];
      f1[2 * j] = s.code[(u1 >> (8 * j + 4)) & 15];
      f1[2 * j + 1] = s.code[(u1 >> (8 * j)) & 15];
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < p.M) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xs + m * xrow + piece * 8 * sizeof(T));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 xf = pair_to_f32<T>(word_of(xv, j));
          part[0][m] = fmaf(f0[2 * j], xf.x, fmaf(f0[2 * j + 1], xf.y, part[0][m]));
          part[1][m] = fmaf(f1[2 * j], xf.x, fmaf(f1[2 * j + 1], xf.y, part[1][m]));
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    acc[0][m] = fmaf(part[0][m], scale[0], acc[0][m]);
    acc[1][m] = fmaf(part[1][m], scale[1], acc[1][m]);
  }
}

// Stage 3 (epilogue): warp reduction of each (row, m) sum, bias, store in T.
template <typename T, int MT>
__device__ __forceinline__ void store_rows(const StagedArgs& p, int n0, int warp, int lane, float (&acc)[2][MT]) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int n = n0 + 2 * warp + rr;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = acc[rr][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && n < p.N && m < p.M) {
        if (p.bias) v += to_f32(static_cast<const T*>(p.bias)[n]);
        static_cast<T*>(p.out)[(int64_t)m * p.N + n] = from_f32<T>(v);
      }
    }
  }
}

// The S-stage ring: prologue issues chunks 0..S-2; iteration c waits until chunk c has landed (at most S-2
// newer groups pending), syncs (chunk c visible to all; slot (c-1)%S free), refills that slot with chunk c+S-1,
// prefetches chunk c+1's absmax into registers and computes chunk c. Every iteration commits one (possibly
// empty) group so the group count stays aligned with the chunk index.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, MT <= 2 ? 4 : 2) gemv4_staged(StagedArgs p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const Smem s(smem_raw, p.M, (int)sizeof(T));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * kRows;
  const int nchunks = (p.K + kChunk - 1) / kChunk;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < nchunks) issue_chunk<T>(p, s, n0, st, st);
    cp_async_commit();
  }
  if (threadIdx.x < 16) s.code[threadIdx.x] = __ldg(p.code + threadIdx.x);
  if (!p.am.plain) s.ncode[threadIdx.x] = __ldg(p.am.nested_code + threadIdx.x);  // 256 threads = 256 entries
  const int nr0 = n0 + 2 * warp, nr1 = nr0 + 1;
  const bool active = nr0 < p.N;  // warp-uniform
  AbsRaw raw0 = fetch_abs(p, nr0, 0, lane), raw1 = fetch_abs(p, nr1, 0, lane);
  float acc[2][MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[0][m] = acc[1][m] = 0.f;
  for (int c = 0; c < nchunks; ++c) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (c + kStages - 1 < nchunks) issue_chunk<T>(p, s, n0, c + kStages - 1, (c + kStages - 1) % kStages);
    cp_async_commit();
    const float scale[2] = {decode_abs(p, s, raw0), decode_abs(p, s, raw1)};
    if (c + 1 < nchunks) {
      raw0 = fetch_abs(p, nr0, c + 1, lane);
      raw1 = fetch_abs(p, nr1, c + 1, lane);
    }
    if (active) compute_chunk<T, MT>(p, s, c % kStages, c, warp, lane, scale, acc);
  }
  cp_async_wait<0>();  // leave no copy outstanding at exit
  if (active) store_rows<T, MT>(p, n0, warp, lane, acc);
}

int device_index() {
  int dev = 0;
  cudaGetDevice(&dev);
  return dev;
}

// Launch one (T, MT) instantiation; the > 48 KB dynamic shared memory opt-in is set once per device (max size).
template <typename T, int MT>
cudaError_t launch_staged(const StagedArgs& p, cudaStream_t stream) {
  static bool configured[64] = {false};
  const int dev = device_index();
  if (dev < 0 || dev >= 64 || !configured[dev]) {
    cudaError_t err = cudaFuncSetAttribute(gemv4_staged<T, MT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)smem_bytes(MT, (int)sizeof(T)));
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) configured[dev] = true;
  }
  const unsigned grid = (unsigned)((p.N + kRows - 1) / kRows);
  gemv4_staged<T, MT><<<grid, kThreads, smem_bytes(p.M, (int)sizeof(T)), stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_staged(const StagedArgs& p, cudaStream_t stream) {
  if (p.M == 1) return launch_staged<T, 1>(p, stream);
  if (p.M == 2) return launch_staged<T, 2>(p, stream);
  if (p.M <= 4) return launch_staged<T, 4>(p, stream);
  return launch_staged<T, 8>(p, stream);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Same arguments as shardq_gemm_4bit_small minus `variant`. Returns cudaErrorNotSupported, launching nothing and
// calling no CUDA API, unless: dtype fp16/bf16, 1 <= M <= 8, K % 64 == 0, blocksize a power of two >= 32
// dividing K, x and w 16-byte aligned (with K % 64 == 0 every weight row and x row start is then aligned too).
SHARDQ_API int shardq_gemv_4bit_staged(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                       const float* nested_absmax, const float* nested_code, float offset,
                                       const float* code, const void* bias, void* out, int64_t M, int64_t N,
                                       int64_t K, int64_t blocksize, int dtype, void* stream_ptr) {
  const int shift = log2_exact(blocksize);
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= 8 && N >= 1 && N <= INT32_MAX && K >= 64 &&
                  K <= INT32_MAX && K % 64 == 0 && shift >= 5 && K % blocksize == 0 &&
                  (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0 &&
                  (absmax != nullptr || (absmax_q != nullptr && nested_absmax != nullptr && nested_code != nullptr));
  if (!ok) return cudaErrorNotSupported;
  const Absmax am{absmax, static_cast<const uint8_t*>(absmax_q), nested_absmax, nested_code, offset};
  const StagedArgs p{x, static_cast<const uint8_t*>(w), am, code, bias, out, (int)M, (int)N, (int)K, shift};
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  SHARDQ_DISPATCH_16(dtype, T, return dispatch_staged<T>(p, stream));
  return cudaErrorNotSupported;
}
