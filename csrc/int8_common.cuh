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

// Output (m, n) from its int32 dot product acc over the non-outlier columns.
template <typename T>
__device__ __noinline__ float epilogue(const Int8Args& p, int m, int n, int acc) {
  const float scb = p.scb[n];
  float v = (float)acc * p.row_absmax[m] * scb * kInv127sq;
  const int cnt = *p.count;
  if (cnt > 0) {
    const T* xr = static_cast<const T*>(p.x) + (int64_t)m * p.K;
    const int8_t* wr = p.w + (int64_t)n * p.K;
    float o = 0.f;
    for (int c = 0; c < cnt; ++c) {
      const int k = p.list[c];
      o += to_f32(xr[k]) * (float)wr[k];
    }
    v += o * scb * (1.f / 127.f);
  }
  if (p.bias) v += to_f32(static_cast<const T*>(p.bias)[n]);
  return v;
}

}  // namespace shardq
