// LLM.int8() matmul for M <= 4 in one launch: out = int8 part + outlier part + bias, as shardq_int8_gemv computes
// it after shardq_int8_prepare, but with the activation side done inside every CTA.
//
// Why: at decode sizes the two-launch path (a one-CTA activation prep, then the GEMV) is latency: 22 us at
// 4096x4096 for 16.8 MB of weights (~6 us of bytes). Here each CTA first issues its first weight loads, then,
// while they are in flight, scans x (a few KB, L2-resident) once: outlier columns (max over rows of |x| >
// threshold) as a bit mask in shared memory, each row's absmax over the other columns, and the quantized rows
// in shared memory with the reference's rounding (quant127), so the int32 sums equal the two-launch path's.
// Then each warp streams 4 weight rows (16-byte loads, two steps in flight), dp4a against the shared q, and
// adds the outlier columns in fp32 from the mask. A CTA covers 32 weight rows, which amortizes the x scan.
// int8_gemv_any (below) is the same idea for M = 1 when K % 32 != 0, where W's rows are not 16-byte aligned.
#include "common.cuh"

namespace shardq {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpRows = 4;               // weight rows per warp
constexpr int kRows = 8 * kWarpRows;       // weight rows per CTA
constexpr int kMaxSmem = 96 * 1024;        // q [M, K] + mask [K / 32] must fit

struct FusedArgs {
  const void* x;      // [M, K]
  const int8_t* w;    // [N, K]
  const float* scb;   // [N]
  const void* bias;
  void* out;
  int M, N, K;
  float threshold;
};

// 16 activations of row m from column k as fp32.
template <typename T>
__device__ __forceinline__ void load16(const FusedArgs& p, int m, int k, float* v) {
  const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + (int64_t)m * p.K + k);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint4 u = __ldg(src + h);
    const uint32_t wds[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const T* pair = reinterpret_cast<const T*>(&wds[j]);
      v[8 * h + 2 * j] = to_f32(pair[0]);
      v[8 * h + 2 * j + 1] = to_f32(pair[1]);
    }
  }
}

// amax[m] = the CTA's maximum of every thread's rmax[m] (all threads call it; amax visible to all on return).
template <int MB>
__device__ __forceinline__ void block_max(const float (&rmax)[MB], float* amax) {
  __shared__ float smax[kThreads / 32][MB];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    float v = rmax[m];
    for (int s = 16; s > 0; s >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, s));
    if (lane == 0) smax[warp][m] = v;
  }
  __syncthreads();
  if (threadIdx.x < MB) {
    float v = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) v = fmaxf(v, smax[w][threadIdx.x]);
    amax[threadIdx.x] = v;
  }
  __syncthreads();
}

// Pass 1 over x: outlier bits into mask (zeroed), each row's absmax over the other columns into amax.
template <typename T, int MB>
__device__ __forceinline__ void scan_x(const FusedArgs& p, uint32_t* mask, float* amax) {
  float rmax[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) rmax[m] = 0.f;
  for (int k = threadIdx.x * 16; k < p.K; k += kThreads * 16) {
    float v[MB][16];
#pragma unroll
    for (int m = 0; m < MB; ++m)
      if (m < p.M) load16<T>(p, m, k, v[m]);
    uint32_t bits = 0;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      float cm = 0.f;
#pragma unroll
      for (int m = 0; m < MB; ++m) cm = m < p.M ? fmaxf(cm, fabsf(v[m][j])) : cm;
      if (p.threshold > 0.f && cm > p.threshold) {
        bits |= 1u << j;
      } else {
#pragma unroll
        for (int m = 0; m < MB; ++m) rmax[m] = m < p.M ? fmaxf(rmax[m], fabsf(v[m][j])) : rmax[m];
      }
    }
    if (bits) atomicOr(&mask[k >> 5], bits << (k & 31));
  }
  block_max<MB>(rmax, amax);
}

// Pass 2 over x: q[m, k] = quant127(x, amax[m]), 0 in outlier columns.
template <typename T, int MB>
__device__ __forceinline__ void quantize_x(const FusedArgs& p, const uint32_t* mask, const float* amax, int8_t* q) {
  for (int k = threadIdx.x * 16; k < p.K; k += kThreads * 16) {
    const uint32_t bits = (mask[k >> 5] >> (k & 31)) & 0xFFFFu;
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m >= p.M) continue;
      float v[16];
      load16<T>(p, m, k, v);
      uint32_t packed[4] = {0u, 0u, 0u, 0u};
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int8_t qv = (bits >> j) & 1u ? (int8_t)0 : quant127(v[j], amax[m]);
        packed[j >> 2] |= (uint32_t)(uint8_t)qv << (8 * (j & 3));
      }
      *reinterpret_cast<uint4*>(q + (int64_t)m * p.K + k) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }
}

__device__ __forceinline__ int4 load_w(const FusedArgs& p, int n, int k) {
  return n < p.N && k < p.K ? __ldcs(reinterpret_cast<const int4*>(p.w + (int64_t)n * p.K + k)) : make_int4(0, 0, 0, 0);
}

// This warp's outlier part: o[m][r] += x[m, c] * W[n0 + r, c] over the outlier columns c (lanes split the mask).
template <typename T, int MB, int R>
__device__ __forceinline__ void outliers(const FusedArgs& p, const uint32_t* mask, int n0, float (&o)[MB][R]) {
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < (p.K + 31) / 32; i += 32) {
    uint32_t bits = mask[i];
    while (bits) {
      const int c = i * 32 + __ffs(bits) - 1;
      bits &= bits - 1;
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m >= p.M) continue;
        const float xv = to_f32(static_cast<const T*>(p.x)[(int64_t)m * p.K + c]);
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (n0 + r < p.N) o[m][r] += xv * (float)p.w[(int64_t)(n0 + r) * p.K + c];
      }
    }
  }
}

// The warp's sums meet (lane 0) and out[m, n0 + r] gets the epilogue: scales, outlier part, bias.
template <typename T, int MB, int R>
__device__ __forceinline__ void store_rows(const FusedArgs& p, const float* amax, int n0, const int (&acc)[MB][R],
                                           const float (&o)[MB][R]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      int a = acc[m][r];
      float f = o[m][r];
      for (int s = 16; s > 0; s >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, s);
        f += __shfl_xor_sync(0xffffffffu, f, s);
      }
      const int n = n0 + r;
      if (lane == 0 && m < p.M && n < p.N) {
        const float scb = p.scb[n];
        float v = (float)a * amax[m] * scb * (1.f / (127.f * 127.f)) + f * scb * (1.f / 127.f);
        if (p.bias) v += to_f32(static_cast<const T*>(p.bias)[n]);
        static_cast<T*>(p.out)[(int64_t)m * p.N + n] = from_f32<T>(v);
      }
    }
}

template <typename T, int MB>
__global__ void __launch_bounds__(kThreads) int8_gemv_fused(FusedArgs p) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float amax[MB];
  int8_t* q = reinterpret_cast<int8_t*>(smem);                                   // [M, K]
  uint32_t* mask = reinterpret_cast<uint32_t*>(smem + ((p.M * p.K + 15) / 16) * 16);  // [K / 32]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * kRows + warp * kWarpRows;
  int4 wv[2][kWarpRows];  // two 512-column steps in flight
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) wv[s][r] = load_w(p, n0 + r, s * 512 + lane * 16);
  for (int i = threadIdx.x; i < p.K / 32; i += kThreads) mask[i] = 0u;
  __syncthreads();
  scan_x<T, MB>(p, mask, amax);
  quantize_x<T, MB>(p, mask, amax, q);
  __syncthreads();
  int acc[MB][kWarpRows];
  float o[MB][kWarpRows];
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) acc[m][r] = 0, o[m][r] = 0.f;
  for (int k0 = 0; k0 < p.K; k0 += 1024) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int k = k0 + s * 512 + lane * 16;
      if (k < p.K) {
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          if (m >= p.M) continue;
          const int4 xq = *reinterpret_cast<const int4*>(q + (int64_t)m * p.K + k);
#pragma unroll
          for (int r = 0; r < kWarpRows; ++r) acc[m][r] = dot16(wv[s][r], xq, acc[m][r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kWarpRows; ++r) wv[s][r] = load_w(p, n0 + r, k + 1024);
    }
  }
  outliers<T, MB, kWarpRows>(p, mask, n0, o);
  store_rows<T, MB, kWarpRows>(p, amax, n0, acc, o);
}

// ---- M = 1 and any K (rows of W not 16-byte aligned, e.g. K = 4097) ----
// x's row is read in 16-byte units (the last partial one element by element) and kept in registers between the scan
// and the quantization; q is staged with zero bytes around it; each lane reads W in 16-byte-aligned chunks of the
// flat weight array and funnel-shifts q's words onto the chunk's columns (bytes of the neighbouring rows meet zeros).
// One weight row per warp, kAnyGroup chunks per lane in flight (N = 1000 gives 1000 warps).
constexpr int kAnyUnits = 8;  // 16-byte units of x per thread
constexpr int kAnyMaxK = 8 * kThreads * kAnyUnits;
constexpr int kAnyGroup = 4;
constexpr int kQPad = 16;  // zero bytes staged before column 0

__host__ __device__ inline int any_q_bytes(int K) { return (kQPad + K + 32 + 15) / 16 * 16; }

// Element j of a 16-byte unit of 16-bit values.
template <typename T>
__device__ __forceinline__ float unit_at(const uint4& u, int j) {
  return to_f32(reinterpret_cast<const T*>(&u)[j]);
}

// Unit i of x's row (zeros past K).
template <typename T>
__device__ __forceinline__ uint4 load_x_unit(const FusedArgs& p, int i) {
  const T* x = static_cast<const T*>(p.x);
  if (8 * i + 8 <= p.K) return __ldg(reinterpret_cast<const uint4*>(x) + i);
  uint4 u = make_uint4(0u, 0u, 0u, 0u);
  T* e = reinterpret_cast<T*>(&u);
  for (int j = 0; j < 8 && 8 * i + j < p.K; ++j) e[j] = x[8 * i + j];
  return u;
}

// Outlier bits into mask (zeroed) and the row's absmax over the other columns (returned to every thread).
template <typename T>
__device__ __forceinline__ float scan_row(const FusedArgs& p, const uint4 (&xu)[kAnyUnits], uint32_t* mask) {
  __shared__ float smax[kThreads / 32];
  float rmax = 0.f;
#pragma unroll
  for (int u = 0; u < kAnyUnits; ++u) {
    const int e0 = 8 * (threadIdx.x + u * kThreads);
    if (e0 >= p.K) break;  // units past K: none of them counts (a row of 4097 fills 2 of the 8)
    uint32_t bits = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float v = fabsf(unit_at<T>(xu[u], j));
      if (p.threshold > 0.f && v > p.threshold) {
        bits |= 1u << j;
      } else {
        rmax = fmaxf(rmax, v);
      }
    }
    if (bits) atomicOr(&mask[e0 >> 5], bits << (e0 & 31));
  }
  for (int s = 16; s > 0; s >>= 1) rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, s));
  if ((threadIdx.x & 31) == 0) smax[threadIdx.x >> 5] = rmax;
  __syncthreads();
  rmax = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) rmax = fmaxf(rmax, smax[w]);
  return rmax;
}

// q[kQPad + k] = quant127(x[k]) (0 in outlier columns), zeros before and after.
template <typename T>
__device__ __forceinline__ void quantize_row(const FusedArgs& p, const uint4 (&xu)[kAnyUnits], const uint32_t* mask,
                                             float amax, int8_t* q) {
  const float f = quant127_factor(amax);
#pragma unroll
  for (int u = 0; u < kAnyUnits; ++u) {
    const int e0 = 8 * (threadIdx.x + u * kThreads);
    if (e0 >= p.K) break;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int k = e0 + j;
      if (k < p.K) q[kQPad + k] = (mask[k >> 5] >> (k & 31)) & 1u ? (int8_t)0 : quant127_by(unit_at<T>(xu[u], j), f);
    }
  }
  for (int i = threadIdx.x; i < kQPad; i += kThreads) q[i] = 0;
  for (int i = kQPad + p.K + threadIdx.x; i < any_q_bytes(p.K); i += kThreads) q[i] = 0;
}

// Weight chunks c0 + lane + 32 j of a row: 16-byte-aligned pieces of the flat array from `first` (the row's first
// byte rounded down to 16); past the array's end, zeros.
__device__ __forceinline__ void load_chunks(const FusedArgs& p, const int8_t* first, int chunks, int c0,
                                            int4 (&wv)[kAnyGroup]) {
  const int8_t* end = p.w + (int64_t)p.N * p.K;
#pragma unroll
  for (int j = 0; j < kAnyGroup; ++j) {
    const int c = c0 + (threadIdx.x & 31) + 32 * j;
    const int8_t* a = first + 16 * c;
    wv[j] = make_int4(0, 0, 0, 0);
    if (c < chunks && a + 16 <= end) {
      wv[j] = __ldcs(reinterpret_cast<const int4*>(a));
    } else if (c < chunks) {
      int8_t* b = reinterpret_cast<int8_t*>(&wv[j]);
      for (int i = 0; i < 16 && a + i < end; ++i) b[i] = a[i];
    }
  }
}

// 16 staged q bytes from byte offset off (any alignment; off >= 1 and off + 19 within the staging).
__device__ __forceinline__ int4 q_unaligned(const int8_t* q, int off) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(q + (off & ~3));
  const int sh = (off & 3) * 8;
  const uint32_t a = w[0], b = w[1], c = w[2], d = w[3], e = w[4];
  return make_int4((int)__funnelshift_r(a, b, sh), (int)__funnelshift_r(b, c, sh), (int)__funnelshift_r(c, d, sh),
                   (int)__funnelshift_r(d, e, sh));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) int8_gemv_any(FusedArgs p) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float amax[1];
  int8_t* q = reinterpret_cast<int8_t*>(smem);
  uint32_t* mask = reinterpret_cast<uint32_t*>(smem + any_q_bytes(p.K));
  const int n = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  const int64_t start = (int64_t)min(n, p.N - 1) * p.K;
  const int lead = (int)(start & 15), chunks = (lead + p.K + 15) / 16;
  const int8_t* first = p.w + (start - lead);
  int4 wv[kAnyGroup];
  load_chunks(p, first, chunks, 0, wv);  // in flight while x is scanned
  uint4 xu[kAnyUnits];
#pragma unroll
  for (int u = 0; u < kAnyUnits; ++u)
    xu[u] = 8 * (threadIdx.x + u * kThreads) < p.K ? load_x_unit<T>(p, threadIdx.x + u * kThreads) : uint4{};
  for (int i = threadIdx.x; i < (p.K + 31) / 32; i += kThreads) mask[i] = 0u;
  __syncthreads();
  const float a = scan_row<T>(p, xu, mask);
  if (threadIdx.x == 0) amax[0] = a;
  quantize_row<T>(p, xu, mask, a, q);
  __syncthreads();
  int acc[1][1] = {{0}};
  for (int c0 = 0; c0 < chunks; c0 += 32 * kAnyGroup) {
    if (c0 > 0) load_chunks(p, first, chunks, c0, wv);
#pragma unroll
    for (int j = 0; j < kAnyGroup; ++j) {
      const int c = c0 + (threadIdx.x & 31) + 32 * j;
      if (c < chunks) acc[0][0] = dot16(wv[j], q_unaligned(q, kQPad + 16 * c - lead), acc[0][0]);
    }
  }
  float o[1][1] = {{0.f}};
  outliers<T, 1, 1>(p, mask, n, o);
  store_rows<T, 1, 1>(p, amax, n, acc, o);
}

// ---- 2 <= M <= 4 and any K: the same with MB staged q rows (rows of x are not 16-byte aligned either: scalar
// reads, twice, the second from L1) ----
template <typename T, int MB>
__device__ __forceinline__ void scan_rows(const FusedArgs& p, uint32_t* mask, float* amax) {
  const T* x = static_cast<const T*>(p.x);
  float rmax[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) rmax[m] = 0.f;
#pragma unroll 4
  for (int k = threadIdx.x; k < p.K; k += kThreads) {
    float v[MB], cm = 0.f;
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      v[m] = m < p.M ? fabsf(to_f32(__ldg(x + (int64_t)m * p.K + k))) : 0.f;
      cm = fmaxf(cm, v[m]);
    }
    if (p.threshold > 0.f && cm > p.threshold) {
      atomicOr(&mask[k >> 5], 1u << (k & 31));
    } else {
#pragma unroll
      for (int m = 0; m < MB; ++m) rmax[m] = fmaxf(rmax[m], v[m]);
    }
  }
  block_max<MB>(rmax, amax);
}

// q row m at q + m * qs: kQPad zeros, quant127(x[m, k]) (0 in outlier columns), zeros after.
template <typename T, int MB>
__device__ __forceinline__ void quantize_rows(const FusedArgs& p, const uint32_t* mask, const float* amax, int8_t* q,
                                              int qs) {
  const T* x = static_cast<const T*>(p.x);
  for (int m = 0; m < p.M; ++m) {
    const float f = quant127_factor(amax[m]);
    int8_t* qm = q + m * qs;
#pragma unroll 4
    for (int k = threadIdx.x; k < p.K; k += kThreads) {
      const float v = to_f32(__ldg(x + (int64_t)m * p.K + k));
      qm[kQPad + k] = (mask[k >> 5] >> (k & 31)) & 1u ? (int8_t)0 : quant127_by(v, f);
    }
    for (int i = threadIdx.x; i < kQPad; i += kThreads) qm[i] = 0;
    for (int i = kQPad + p.K + threadIdx.x; i < qs; i += kThreads) qm[i] = 0;
  }
}

template <typename T, int MB>
__global__ void __launch_bounds__(kThreads) int8_gemv_any_mb(FusedArgs p) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float amax[MB];
  const int qs = any_q_bytes(p.K);
  int8_t* q = reinterpret_cast<int8_t*>(smem);
  uint32_t* mask = reinterpret_cast<uint32_t*>(smem + (size_t)MB * qs);
  const int n = blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  const int64_t start = (int64_t)min(n, p.N - 1) * p.K;
  const int lead = (int)(start & 15), chunks = (lead + p.K + 15) / 16;
  const int8_t* first = p.w + (start - lead);
  int4 wv[kAnyGroup];
  load_chunks(p, first, chunks, 0, wv);  // in flight while x is scanned
  for (int i = threadIdx.x; i < (p.K + 31) / 32; i += kThreads) mask[i] = 0u;
  __syncthreads();
  scan_rows<T, MB>(p, mask, amax);
  quantize_rows<T, MB>(p, mask, amax, q, qs);
  __syncthreads();
  int acc[MB][1] = {};
  for (int c0 = 0; c0 < chunks; c0 += 32 * kAnyGroup) {
    if (c0 > 0) load_chunks(p, first, chunks, c0, wv);
#pragma unroll
    for (int j = 0; j < kAnyGroup; ++j) {
      const int c = c0 + (threadIdx.x & 31) + 32 * j;
      if (c >= chunks) continue;
#pragma unroll
      for (int m = 0; m < MB; ++m)
        if (m < p.M) acc[m][0] = dot16(wv[j], q_unaligned(q + m * qs, kQPad + 16 * c - lead), acc[m][0]);
    }
  }
  float o[MB][1] = {};
  outliers<T, MB, 1>(p, mask, n, o);
  store_rows<T, MB, 1>(p, amax, n, acc, o);
}

template <typename T>
cudaError_t launch_any_mb(const FusedArgs& p, size_t smem, cudaStream_t stream) {
  static bool configured[2][64] = {};
  const unsigned grid = (unsigned)((p.N + kThreads / 32 - 1) / (kThreads / 32));
  if (p.M == 2) {
    const cudaError_t err = allow_smem(int8_gemv_any_mb<T, 2>, kMaxSmem, configured[0]);
    if (err != cudaSuccess) return err;
    int8_gemv_any_mb<T, 2><<<grid, kThreads, smem, stream>>>(p);
  } else {
    const cudaError_t err = allow_smem(int8_gemv_any_mb<T, 4>, kMaxSmem, configured[1]);
    if (err != cudaSuccess) return err;
    int8_gemv_any_mb<T, 4><<<grid, kThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_any(const FusedArgs& p, size_t smem, cudaStream_t stream) {
  static bool configured[64] = {};
  const cudaError_t err = allow_smem(int8_gemv_any<T>, kMaxSmem, configured);
  if (err != cudaSuccess) return err;
  int8_gemv_any<T><<<(unsigned)((p.N + kThreads / 32 - 1) / (kThreads / 32)), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int MB>
cudaError_t launch_mb(const FusedArgs& p, size_t smem, cudaStream_t stream) {
  static bool configured[64] = {};
  const cudaError_t err = allow_smem(int8_gemv_fused<T, MB>, kMaxSmem, configured);
  if (err != cudaSuccess) return err;
  int8_gemv_fused<T, MB><<<(unsigned)((p.N + kRows - 1) / kRows), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fused(const FusedArgs& p, size_t smem, cudaStream_t stream) {
  if (p.M == 1) return launch_mb<T, 1>(p, smem, stream);
  if (p.M == 2) return launch_mb<T, 2>(p, smem, stream);
  return launch_mb<T, 4>(p, smem, stream);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// out[M, N] = int8_linear(x, w, scb, bias, threshold) for 1 <= M <= 4 in one launch. Returns cudaErrorNotSupported,
// launching nothing, unless: dtype fp16/bf16, x and w 16-byte aligned, and either K % 32 == 0 with
// M * K + K / 8 <= 96 KB, or (any K: the unaligned-row kernels) M = 1 with K <= 16384, or 2 <= M <= 4 with 2 or 4
// staged rows of about K + 48 bytes fitting in 96 KB.
SHARDQ_API int shardq_int8_gemv_fused(const void* x, const void* w, const float* scb, const void* bias, void* out,
                                      int64_t M, int64_t N, int64_t K, float threshold, int dtype,
                                      void* stream_ptr) {
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= 4 && N >= 1 && N <= INT32_MAX - 8 && K >= 1 &&
                  K <= INT32_MAX / 8 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0;
  if (!ok) return cudaErrorNotSupported;
  const FusedArgs p{x, static_cast<const int8_t*>(w), scb, bias, out, (int)M, (int)N, (int)K, threshold};
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const size_t smem = (size_t)((M * K + 15) / 16) * 16 + (size_t)(K / 32) * 4;
  if (K % 32 == 0 && smem <= (size_t)kMaxSmem) {
    SHARDQ_DISPATCH_16(dtype, T, return launch_fused<T>(p, smem, stream));
  }
  if (M == 1 && K <= kAnyMaxK) {
    const size_t any_smem = (size_t)any_q_bytes((int)K) + (size_t)((K + 31) / 32) * 4;
    SHARDQ_DISPATCH_16(dtype, T, return launch_any<T>(p, any_smem, stream));
  }
  const size_t mb_smem = (size_t)(M <= 2 ? 2 : 4) * any_q_bytes((int)K) + (size_t)((K + 31) / 32) * 4;
  if (M >= 2 && mb_smem <= (size_t)kMaxSmem) {
    SHARDQ_DISPATCH_16(dtype, T, return launch_any_mb<T>(p, mb_smem, stream));
  }
  return cudaErrorNotSupported;
}
