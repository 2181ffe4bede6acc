// LLM.int8() matmul back ends, both ending in the same fused dequantizing epilogue:
//   out[m, n] = acc[m, n] * row_absmax[m] * SCB[n] / 127^2                (int8 part, int32 accumulation)
//             + sum_{c in outliers} x[m, c] * W[n, c] * SCB[n] / 127       (outlier columns, fp32)
//             + bias[n]
//  - shardq_int8_gemv (small M): each CTA streams 4 weight rows with 128-bit loads (half the bytes of fp16),
//    its warps splitting K, dp4a against the quantized activations, epilogue fused. Scalar variant for
//    K % 16 != 0.
//  - shardq_int8_epilogue (large M): applies the epilogue to the int32 product of a tensor-core GEMM
//    (torch._int_mm / cuBLASLt), tiled so the outlier part is a small shared-memory GEMM.
// Int8Args and epilogue() live in int8_common.cuh (shared with int8_gemm_tc.cu).
#include "int8_common.cuh"

namespace shardq {
namespace {

constexpr int kRows = 4;  // weight rows (output columns) per CTA

// One CTA computes kRows output columns for activation rows m0 .. m0+MB-1; its 8 warps split K (each thread
// keeps kRows 128-bit weight loads in flight), reduce through shared memory, and MB*kRows threads run the
// epilogue. VEC: 16 int8 per load (K % 16 == 0, aligned); otherwise one byte per load.
template <typename T, int MB, bool VEC>
__global__ void __launch_bounds__(256) int8_gemv(Int8Args p, int m0) {
  __shared__ int red[8][MB * kRows];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nbase = blockIdx.x * kRows;
  int acc[MB][kRows];
#pragma unroll
  for (int i = 0; i < MB; ++i)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[i][r] = 0;
  if (VEC) {
    for (int k = tid * 16; k < p.K; k += 256 * 16) {
      int4 wv[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        wv[r] = nbase + r < p.N ? __ldcs(reinterpret_cast<const int4*>(p.w + (int64_t)(nbase + r) * p.K + k))
                                : make_int4(0, 0, 0, 0);
#pragma unroll
      for (int i = 0; i < MB; ++i) {
        if (m0 + i < p.M) {
          const int4 xv = __ldg(reinterpret_cast<const int4*>(p.q + (int64_t)(m0 + i) * p.K + k));
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[i][r] = dot16(wv[r], xv, acc[i][r]);
        }
      }
    }
  } else {
    for (int k = tid; k < p.K; k += 256) {
      int wv[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) wv[r] = nbase + r < p.N ? (int)p.w[(int64_t)(nbase + r) * p.K + k] : 0;
#pragma unroll
      for (int i = 0; i < MB; ++i)
        if (m0 + i < p.M) {
          const int xv = p.q[(int64_t)(m0 + i) * p.K + k];
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[i][r] += wv[r] * xv;
        }
    }
  }
#pragma unroll
  for (int i = 0; i < MB; ++i)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      int v = acc[i][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) red[warp][i * kRows + r] = v;
    }
  __syncthreads();
  if (tid < MB * kRows) {
    const int i = tid / kRows, r = tid % kRows, m = m0 + i, n = nbase + r;
    if (m < p.M && n < p.N) {
      int v = 0;
#pragma unroll
      for (int w = 0; w < 8; ++w) v += red[w][tid];
      static_cast<T*>(p.out)[(int64_t)m * p.N + n] = from_f32<T>(epilogue<T>(p, m, n, v));
    }
  }
}

// 32 x 64 output tile per CTA of 256 threads; each thread 8 rows of one column.
template <typename T>
__global__ void __launch_bounds__(256) int8_epilogue_tiled(Int8Args p, const int* __restrict__ acc, int64_t ldacc) {
  __shared__ float xs[32][33];
  __shared__ float ws[64][33];
  const int tid = threadIdx.x, nl = tid & 63, mg = tid >> 6;
  const int n0 = blockIdx.x * 64, mbase = blockIdx.y * 32;
  const int n = n0 + nl;
  float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const int cnt = *p.count;
  const T* xt = static_cast<const T*>(p.x);
  for (int c0 = 0; c0 < cnt; c0 += 32) {
    const int cn = cnt - c0 < 32 ? cnt - c0 : 32;
    for (int i = tid; i < 32 * 32; i += 256) {
      const int mm = i >> 5, cc = i & 31, m = mbase + mm;
      xs[mm][cc] = (cc < cn && m < p.M) ? to_f32(xt[(int64_t)m * p.K + p.list[c0 + cc]]) : 0.f;
    }
    for (int i = tid; i < 64 * 32; i += 256) {
      const int nn = i >> 5, cc = i & 31, nw = n0 + nn;
      ws[nn][cc] = (cc < cn && nw < p.N) ? (float)p.w[(int64_t)nw * p.K + p.list[c0 + cc]] : 0.f;
    }
    __syncthreads();
    for (int cc = 0; cc < cn; ++cc) {
      const float wv = ws[nl][cc];
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] += xs[mg * 8 + i][cc] * wv;
    }
    __syncthreads();
  }
  if (n >= p.N) return;
  const float scb = p.scb[n];
  const float b = p.bias ? to_f32(static_cast<const T*>(p.bias)[n]) : 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int m = mbase + mg * 8 + i;
    if (m < p.M) {
      const float v = (float)acc[m * ldacc + n] * p.row_absmax[m] * scb * kInv127sq + o[i] * scb * (1.f / 127.f) + b;
      static_cast<T*>(p.out)[(int64_t)m * p.N + n] = from_f32<T>(v);
    }
  }
}

template <typename T, int MB, bool VEC>
cudaError_t gemv_chunk(const Int8Args& p, int m0, cudaStream_t stream) {
  const unsigned grid = (unsigned)((p.N + kRows - 1) / kRows);
  int8_gemv<T, MB, VEC><<<grid, 256, 0, stream>>>(p, m0);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gemv_all(const Int8Args& p, cudaStream_t stream) {
  const bool vec = p.K % 16 == 0 && (uintptr_t)p.w % 16 == 0 && (uintptr_t)p.q % 16 == 0;
  if (vec && p.M <= 4) {
    if (p.M == 1) return gemv_chunk<T, 1, true>(p, 0, stream);
    if (p.M == 2) return gemv_chunk<T, 2, true>(p, 0, stream);
    return gemv_chunk<T, 4, true>(p, 0, stream);
  }
  for (int m0 = 0; m0 < p.M; m0 += 8) {  // 8 activation rows per pass over the weight
    const cudaError_t err = vec ? gemv_chunk<T, 8, true>(p, m0, stream) : gemv_chunk<T, 8, false>(p, m0, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Full int8 matmul on CUDA cores (any M; one pass over W per 8 rows of x, meant for M <= 32) with the fused epilogue.
SHARDQ_API int shardq_int8_gemv(const void* q, const float* row_absmax, const void* x, const void* w,
                                const float* scb, const int* list, const int* count, const void* bias, void* out,
                                int64_t M, int64_t N, int64_t K, int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (M <= 0 || N <= 0 || K <= 0 || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return cudaErrorInvalidValue;
  const Int8Args p{static_cast<const int8_t*>(q), row_absmax, x, static_cast<const int8_t*>(w), scb, list, count,
                   bias, out, (int)M, (int)N, (int)K};
  SHARDQ_DISPATCH_ALL(dtype, T, return gemv_all<T>(p, stream));
  return cudaErrorInvalidValue;
}

// Epilogue over acc = q @ W.T computed as int32 [M, >= N] (row stride ldacc) by a tensor-core GEMM.
SHARDQ_API int shardq_int8_epilogue(const int* acc, int64_t ldacc, const float* row_absmax, const void* x, const void* w,
                                    const float* scb, const int* list, const int* count, const void* bias, void* out,
                                    int64_t M, int64_t N, int64_t K, int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (M <= 0 || N <= 0 || K <= 0 || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || ldacc < N)
    return cudaErrorInvalidValue;
  const Int8Args p{nullptr, row_absmax, x, static_cast<const int8_t*>(w), scb, list, count, bias, out,
                   (int)M, (int)N, (int)K};
  const dim3 grid((unsigned)((N + 63) / 64), (unsigned)((M + 31) / 32));
  if (grid.y > 65535) return cudaErrorInvalidValue;
  SHARDQ_DISPATCH_ALL(dtype, T, {
    int8_epilogue_tiled<T><<<grid, 256, 0, stream>>>(p, acc, ldacc);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}
