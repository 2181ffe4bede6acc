// LLM.int8() pieces shared by the int8 matmul back ends (int8_matmul.cu, int8_gemm_tc.cu): the launch arguments and
// the fused dequantizing epilogue
//   out[m, n] = acc * row_absmax[m] * SCB[n] / 127^2 + sum_{c in outliers} x[m, c] * W[n, c] * SCB[n] / 127 + bias[n].
#pragma once
#include "common.cuh"

namespace shardq {

constexpr float kInv127sq = 1.f / (127.f * 127.f);

struct Int8Args {
  const int8_t* q;          // [M, K] quantized activations
  const float* row_absmax;  // [M]
  const void* x;            // [M, K] original activations (outlier columns)
  const int8_t* w;          // [N, K]
  const float* scb;         // [N]
  const int* list;          // outlier columns
  const int* count;
  const void* bias;
  void* out;
  int M, N, K;
};

// Sum over outlier columns [from, count) of x[m, c] * W[n, c] in list order, added to o (read from global memory).
template <typename T>
__device__ __forceinline__ float outlier_tail(const Int8Args& p, int m, int n, int from, int cnt, float o) {
  const T* xr = static_cast<const T*>(p.x) + (int64_t)m * p.K;
  const int8_t* wr = p.w + (int64_t)n * p.K;
  for (int c = from; c < cnt; ++c) {
    const int k = p.list[c];
    o += to_f32(xr[k]) * (float)wr[k];
  }
  return o;
}

// Output (m, n) from its int32 dot product acc over the non-outlier columns and the outlier sum o.
template <typename T>
__device__ __forceinline__ float finish_out(const Int8Args& p, int m, int n, int acc, float o) {
  const float scb = p.scb[n];
  float v = (float)acc * p.row_absmax[m] * scb * kInv127sq + o * scb * (1.f / 127.f);
  if (p.bias) v += to_f32(static_cast<const T*>(p.bias)[n]);
  return v;
}

// Output (m, n) from its int32 dot product acc over the non-outlier columns.
template <typename T>
__device__ __noinline__ float epilogue(const Int8Args& p, int m, int n, int acc) {
  return finish_out<T>(p, m, n, acc, outlier_tail<T>(p, m, n, 0, *p.count, 0.f));
}

// Outlier columns staged once per CTA of R consecutive output rows (from n0): the first kStagedOutliers columns of
// W (wo[c * R + r], fp32) and of x (xo[m * kStagedOutliers + c]), so that epilogue_staged gathers them from shared
// memory instead of once per output. Returns how many were staged.
constexpr int kStagedOutliers = 32;

template <typename T, int R>
__device__ __forceinline__ int stage_outliers(const Int8Args& p, int n0, float* wo, float* xo, int threads) {
  const int staged = min(*p.count, kStagedOutliers);
  for (int i = threadIdx.x; i < staged * R; i += threads) {
    const int c = i / R, n = min(n0 + i % R, p.N - 1);
    wo[i] = (float)p.w[(int64_t)n * p.K + p.list[c]];
  }
  for (int i = threadIdx.x; i < staged * p.M; i += threads) {
    const int m = i / staged, c = i % staged;
    xo[m * kStagedOutliers + c] = to_f32(static_cast<const T*>(p.x)[(int64_t)m * p.K + p.list[c]]);
  }
  return staged;
}

// epilogue() with the first `staged` outlier columns from stage_outliers (r = n - n0): the same sums in the same
// order, so the same result bit for bit.
template <typename T, int R>
__device__ __forceinline__ float epilogue_staged(const Int8Args& p, int m, int n, int r, int acc, const float* wo,
                                                 const float* xo, int staged) {
  float o = 0.f;
  for (int c = 0; c < staged; ++c) o += xo[m * kStagedOutliers + c] * wo[c * R + r];
  return finish_out<T>(p, m, n, acc, outlier_tail<T>(p, m, n, staged, *p.count, o));
}

}  // namespace shardq
