// LLM.int8() matmul back ends, both ending in the same fused dequantizing epilogue:
//   out[m, n] = acc[m, n] * row_absmax[m] * SCB[n] / 127^2                (int8 part, int32 accumulation)
//             + sum_{c in outliers} x[m, c] * W[n, c] * SCB[n] / 127       (outlier columns, fp32)
//             + bias[n]
//  - shardq_int8_gemv (small M): each CTA streams 4 weight rows with 128-bit loads (half the bytes of fp16),
//    its warps splitting K, dp4a against the quantized activations, epilogue fused. Scalar variant for
//    K % 16 != 0.
//  - shardq_int8_epilogue (large M): applies the epilogue to the int32 product of a tensor-core GEMM
//    (torch._int_mm / cuBLASLt): 16-byte loads of the product, the weight's outlier columns gathered once per CTA
//    into shared memory, x's compacted by int8_prepare.
// Int8Args and epilogue() live in int8_common.cuh (shared with int8_gemm_tc.cu).
#include <algorithm>

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

// Large-M epilogue: a CTA owns 32*V output columns (V per lane: one 16-byte int32 load of acc) over a run of
// rows, one row per warp at a time. The weight's first kStaged outlier columns for those output columns are
// gathered once into shared memory; x's come compacted from xo (rows of xo_cap, written by int8_prepare) and are
// broadcast across the warp by shuffles. Outliers past kStaged (rare) are read straight from global memory.
constexpr int kStaged = 64;

template <typename T, int V>
__device__ __forceinline__ void store_out(T* out, const float* v) {
  if constexpr (V == 1) {
    *out = from_f32<T>(v[0]);
  } else if constexpr (sizeof(T) == 2) {
    static_assert(V == 4, "4 outputs per store");
    uint2 u;
    u.x = pack_pair<T>(v[0], v[1]);
    u.y = pack_pair<T>(v[2], v[3]);
    *reinterpret_cast<uint2*>(out) = u;
  } else {
    *reinterpret_cast<float4*>(out) = make_float4(v[0], v[1], v[2], v[3]);
  }
}

// What the epilogue reads for one row m: the lane's V int32 products, x's staged outlier values (lane c holds
// outliers c and 32 + c, from xo or gathered from x) and the row's absmax.
template <int V>
struct RowIn {
  int a[V];
  float xv[kStaged / 32];
  float ra;
};

template <typename T, int V>
__device__ __forceinline__ RowIn<V> load_row(const Int8Args& p, const int* __restrict__ acc, int64_t ldacc,
                                             const T* __restrict__ xo, int xo_cap, int m, int n0, bool live,
                                             int staged) {
  RowIn<V> in;
  const int lane = threadIdx.x & 31;
  if constexpr (V == 4) {
    const int4 t = live ? __ldcs(reinterpret_cast<const int4*>(acc + m * ldacc + n0)) : make_int4(0, 0, 0, 0);
    in.a[0] = t.x, in.a[1] = t.y, in.a[2] = t.z, in.a[3] = t.w;
  } else {
    in.a[0] = live ? __ldcs(acc + m * ldacc + n0) : 0;
  }
  const T* xt = static_cast<const T*>(p.x);
#pragma unroll
  for (int h = 0; h < kStaged / 32; ++h) {
    const int c = h * 32 + lane;
    in.xv[h] = c >= staged ? 0.f
               : to_f32(xo != nullptr && c < xo_cap ? xo[(int64_t)m * xo_cap + c] : xt[(int64_t)m * p.K + p.list[c]]);
  }
  in.ra = p.row_absmax[m] * kInv127sq;
  return in;
}

// Each warp walks its rows with the next row's loads in flight while it computes the current one.
template <typename T, int V>
__global__ void __launch_bounds__(256) int8_epilogue_rows(Int8Args p, const int* __restrict__ acc, int64_t ldacc,
                                                          const T* __restrict__ xo, int xo_cap, int rows_per_cta) {
  constexpr int kCols = 32 * V;
  __shared__ __align__(16) float ws[kStaged][kCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * kCols + lane * V;
  const int cnt = *p.count, staged = min(cnt, kStaged);
  for (int i = threadIdx.x; i < staged * kCols; i += 256) {
    const int c = i / kCols, nn = i - c * kCols, n = blockIdx.x * kCols + nn;
    ws[c][nn] = n < p.N ? (float)p.w[(int64_t)n * p.K + p.list[c]] : 0.f;
  }
  __syncthreads();
  const bool live = n0 < p.N;  // V = 4 requires N % 4 == 0, so a live lane's V columns all exist
  float scb[V], bias[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    scb[i] = live ? p.scb[n0 + i] : 0.f;
    bias[i] = live && p.bias ? to_f32(static_cast<const T*>(p.bias)[n0 + i]) : 0.f;
  }
  const int mend = min(p.M, (blockIdx.y + 1) * rows_per_cta);
  int m = blockIdx.y * rows_per_cta + warp;
  if (m >= mend) return;
  RowIn<V> cur = load_row<T, V>(p, acc, ldacc, xo, xo_cap, m, n0, live, staged);
  for (; m < mend; m += 8) {
    RowIn<V> next = cur;
    if (m + 8 < mend) next = load_row<T, V>(p, acc, ldacc, xo, xo_cap, m + 8, n0, live, staged);
    float o[V];
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = 0.f;
#pragma unroll
    for (int h = 0; h < kStaged / 32; ++h) {  // warp-uniform bounds: every lane takes part in the shuffles
      const int nc = min(32, staged - h * 32);
#pragma unroll 8
      for (int j = 0; j < nc; ++j) {
        const float xj = __shfl_sync(0xffffffffu, cur.xv[h], j);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] += xj * ws[h * 32 + j][lane * V + i];
      }
    }
    if (live) {
      const T* xt = static_cast<const T*>(p.x);
      for (int c = staged; c < cnt; ++c) {  // outliers past the staged ones (rare): straight from global memory
        const int k = p.list[c];
        const float xk = to_f32(xt[(int64_t)m * p.K + k]);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] += xk * (float)p.w[(int64_t)(n0 + i) * p.K + k];
      }
      float v[V];
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = (float)cur.a[i] * cur.ra * scb[i] + o[i] * scb[i] * (1.f / 127.f) + bias[i];
      store_out<T, V>(static_cast<T*>(p.out) + (int64_t)m * p.N + n0, v);
    }
    cur = next;
  }
}

// Rows per CTA: ~16 CTAs per SM (4 waves at 4 resident: a partial last wave costs little; with ~4 per SM, N =
// 11008 ran 1.3 waves and its epilogue took 104 instead of 85 us on an H200), 32 to 512 rows (fewer rows repeat
// the CTA's weight gather too often), more only if the grid's y limit needs it; a multiple of 8, a row per warp.
inline int epilogue_rows_per_cta(int64_t M, int64_t col_tiles) {
  const int64_t per_col = std::max<int64_t>(1, (16 * sm_count() + col_tiles - 1) / col_tiles);
  const int64_t rows = std::max<int64_t>(std::min<int64_t>(512, std::max<int64_t>(32, (M + per_col - 1) / per_col)),
                                         (M + 65534) / 65535);
  return (int)((rows + 7) / 8 * 8);
}

template <typename T, int V>
cudaError_t launch_epilogue(const Int8Args& p, const int* acc, int64_t ldacc, const void* xo, int64_t xo_cap,
                            cudaStream_t stream) {
  const int64_t tiles = (p.N + 32 * V - 1) / (32 * V);
  const int rows = epilogue_rows_per_cta(p.M, tiles);
  const dim3 grid((unsigned)tiles, (unsigned)((p.M + rows - 1) / rows));
  int8_epilogue_rows<T, V><<<grid, 256, 0, stream>>>(p, acc, ldacc, static_cast<const T*>(xo), (int)xo_cap, rows);
  return cudaGetLastError();
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

// Epilogue over acc = q @ W.T computed as int32 [M, >= N] (row stride ldacc) by a tensor-core GEMM. xo (may be
// null): the compacted outlier columns of x from shardq_int8_prepare, rows of xo_cap.
SHARDQ_API int shardq_int8_epilogue(const int* acc, int64_t ldacc, const float* row_absmax, const void* xo,
                                    int64_t xo_cap, const void* x, const void* w, const float* scb, const int* list,
                                    const int* count, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                    int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (M <= 0 || N <= 0 || K <= 0 || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || ldacc < N || xo_cap < 0 ||
      xo_cap > INT32_MAX)
    return cudaErrorInvalidValue;
  const Int8Args p{nullptr, row_absmax, x, static_cast<const int8_t*>(w), scb, list, count, bias, out,
                   (int)M, (int)N, (int)K};
  const int elt = dtype == kF32 ? 4 : 2;
  const bool vec = N % 4 == 0 && ldacc % 4 == 0 && (uintptr_t)acc % 16 == 0 && (uintptr_t)out % (4 * elt) == 0;
  SHARDQ_DISPATCH_ALL(dtype, T, {
    return vec ? launch_epilogue<T, 4>(p, acc, ldacc, xo, xo_cap, stream)
               : launch_epilogue<T, 1>(p, acc, ldacc, xo, xo_cap, stream);
  });
  return cudaErrorInvalidValue;
}
