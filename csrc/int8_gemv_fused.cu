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

// Pass 1 over x: outlier bits into mask (zeroed), each row's absmax over the other columns into amax.
template <typename T, int MB>
__device__ __forceinline__ void scan_x(const FusedArgs& p, uint32_t* mask, float* amax) {
  __shared__ float smax[kThreads / 32][MB];
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
template <typename T, int MB>
__device__ __forceinline__ void outliers(const FusedArgs& p, const uint32_t* mask, int n0, float (&o)[MB][kWarpRows]) {
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < p.K / 32; i += 32) {
    uint32_t bits = mask[i];
    while (bits) {
      const int c = i * 32 + __ffs(bits) - 1;
      bits &= bits - 1;
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m >= p.M) continue;
        const float xv = to_f32(static_cast<const T*>(p.x)[(int64_t)m * p.K + c]);
#pragma unroll
        for (int r = 0; r < kWarpRows; ++r)
          if (n0 + r < p.N) o[m][r] += xv * (float)p.w[(int64_t)(n0 + r) * p.K + c];
      }
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
  outliers<T, MB>(p, mask, n0, o);
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) {
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
// launching nothing, unless: dtype fp16/bf16, K % 32 == 0, M * K + K / 8 <= 96 KB, x and w 16-byte aligned.
SHARDQ_API int shardq_int8_gemv_fused(const void* x, const void* w, const float* scb, const void* bias, void* out,
                                      int64_t M, int64_t N, int64_t K, float threshold, int dtype,
                                      void* stream_ptr) {
  const size_t smem = (size_t)((M * K + 15) / 16) * 16 + (size_t)(K / 32) * 4;
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= 4 && N >= 1 && N <= INT32_MAX && K >= 32 &&
                  K % 32 == 0 && smem <= (size_t)kMaxSmem && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0;
  if (!ok) return cudaErrorNotSupported;
  const FusedArgs p{x, static_cast<const int8_t*>(w), scb, bias, out, (int)M, (int)N, (int)K, threshold};
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  SHARDQ_DISPATCH_16(dtype, T, return launch_fused<T>(p, smem, stream));
  return cudaErrorNotSupported;
}
