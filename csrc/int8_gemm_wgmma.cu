// LLM.int8() matmul for prefill-sized batches on Hopper (sm_90a): the int8 GEMM on the warpgroup MMA (s8 x s8 ->
// s32) with the dequantizing epilogue fused, so the int32 product never goes to global memory:
//   out[m, n] = acc[m, n] * (row_absmax[m] / 127^2) * SCB[n] + o[m, n] * SCB[n] / 127 + bias[n],
//   o[m, n] = sum over outlier columns c of x[m, c] * W[n, c]   (the epilogue of int8_epilogue_rows, int8_matmul.cu)
//
// Why: the unfused path (cuBLASLt int8 through torch._int_mm, then int8_epilogue_rows) writes and reads back M x N
// int32 (8192x28672 at M = 4096: 470 MB each way), and cuBLASLt's int8 GEMM itself measured only 1.15-1.36x faster
// than fp16 cuBLAS on an H200 (bench/RESULTS.md).
//
// Operands: q (prepared activations [M, K], outlier columns zeroed) is wgmma's A, W [N, K] its B, both K-major
// int8 read by the tensor cores from shared memory through 128-byte-swizzle descriptors (rows of 128 k; a k32 step
// moves the descriptors 32 bytes). A CTA owns 128 tokens x 256 features: two warpgroups, each m64 x n256, four
// m64n256k32 wgmmas per 128-k tile. D per warp (w = warp in its warpgroup): d[4j + c] = (token 16 w + g + 8 (c >> 1),
// feature 8j + 2t + (c & 1)), g = lane >> 2, t = lane & 3: the mma.m16n8 C layout, so the outlier part runs as
// mma.m16n8k16 (x's outlier values and W's outlier columns as fp16/bf16, both exact: |W| <= 127) into the same
// positions, and each lane stores two adjacent features.
//
// Schedule: warp-specialized. Three warpgroups: one thread of the first issues TMA tile copies (q's 128 x 128-byte
// box and W's 256 x 128-byte box per k-tile, 128-byte swizzle, rows past M or N zero-filled) into an S-stage ring,
// each stage's "full" mbarrier counting the bytes in; the other two are the consumers, each running its m64 x n256
// wgmmas of a k-tile as soon as the stage is full and releasing the stage (its "empty" mbarrier) once the wgmmas
// of that k-tile have completed. The copy engine works alone, so the consumers' instruction stream is only
// barrier waits and wgmmas (setmaxnreg moves the producer's registers to them). Scales, bias and the first
// kStagedOut outlier columns (x's and W's) are staged in shared memory by all threads while the first k-tiles land.
//
// Measured (H200, bench/RESULTS.md): ~0.87 POPS at M = 4096, on par with cuBLASLt's int8 GEMM + the separate
// epilogue, so the op keeps that path by default. The tensor cores run these wgmmas at ~1.94 POPS with the operands
// already in shared memory (bench/wgmma_probe.cu); the feed is the limit: per k-tile the TMA writes 48 KB into
// shared memory and the two consumers' wgmmas read 80 KB from it. Two-CTA clusters sharing the W tile by TMA
// multicast (a third fewer L2 reads) measured slower (3.26 vs 2.52 ms at 8192x28672, M = 4096).
#include <cudaTypedefs.h>

#include "int8_common.cuh"
#include "wgmma.cuh"

#pragma nv_diag_suppress 177  // the kernel body is compiled only for sm_90a: other passes leave constants unused

namespace shardq {
namespace {

constexpr int kBM = 128, kBN = 256, kBK = 128, kS = 4, kThreads = 384;  // a producer and two consumer warpgroups
constexpr int kStage = (kBM + kBN) * kBK;  // 48 KB: q rows, then W rows
constexpr int kStagedOut = 32;             // outlier columns staged; more are read from global memory (rare)
constexpr int kOutPitch = kStagedOut + 8;  // elements per staged row: 80 bytes, conflict-free fragment loads

template <typename T>
struct I8Smem {  // after the ring
  uint64_t full[kS], empty[kS];  // mbarriers: stage landed (48 KB), stage free (both consumers done with it)
  T xo[kBM][kOutPitch];
  T wo[kBN][kOutPitch];
  float ra[kBM];  // row_absmax / 127^2
  float scb[kBN], bias[kBN];
};

template <typename T>
constexpr size_t i8_smem() { return 1024 + (size_t)kS * kStage + sizeof(I8Smem<T>); }

struct I8WgArgs : Int8Args {
  const void* xo;  // [M, xo_cap] x's outlier columns compacted by int8_prepare, or null (read from x)
  int xo_cap, mtiles, ntiles;
};

// d (int32, accumulated) += A (descriptor) x B (descriptor): one m64 x n256 x k32 step.
__device__ __forceinline__ void wgmma_s8(int* d, uint64_t a, uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21,"
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41,"
      "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61,"
      "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81,"
      "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101,"
      "%102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118,"
      "%119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]),
        "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]),
        "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]),
        "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]),
        "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(a), "l"(b), "r"(1));
}

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ void bar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(smem_u32(bar)), "r"(parity)
      : "memory");
}
// TMA: the box at (column x, row y) of `map` into shared memory at dst, its bytes counted on `bar`.
__device__ __forceinline__ void tma_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_u32(bar))
      : "memory");
}

// k-tile kt into ring stage kt % kS: q rows m0.. (128) and W rows n0.. (256), 128 k each.
__device__ __forceinline__ void load_stage(uint8_t* ring, uint64_t* full, const CUtensorMap* tq, const CUtensorMap* tw,
                                           int kt, int m0, int n0) {
  const int st = kt % kS;
  uint8_t* dst = ring + st * kStage;
  bar_expect(&full[st], kStage);
  tma_2d(dst, tq, kt * kBK, m0, &full[st]);
  tma_2d(dst + kBM * 128, tw, kt * kBK, n0, &full[st]);
}

// x's value in outlier column c (list order) of row m: from the compacted copy where it holds it.
template <typename T>
__device__ __forceinline__ T outlier_x(const I8WgArgs& p, int64_t m, int c) {
  if (p.xo != nullptr && c < p.xo_cap) return static_cast<const T*>(p.xo)[m * p.xo_cap + c];
  return static_cast<const T*>(p.x)[m * p.K + p.list[c]];
}

// The CTA's row scales, column scales, bias and first kStagedOut outlier columns of x and W (zeros past them).
template <typename T>
__device__ __forceinline__ void stage_side(const I8WgArgs& p, I8Smem<T>& s, int m0, int n0, int staged) {
  for (int i = threadIdx.x; i < kBM * kStagedOut; i += kThreads) {
    const int m = i / kStagedOut, c = i % kStagedOut;
    s.xo[m][c] = c < staged && m0 + m < p.M ? outlier_x<T>(p, m0 + m, c) : from_f32<T>(0.f);
  }
  for (int i = threadIdx.x; i < kBN * kStagedOut; i += kThreads) {
    const int n = i / kStagedOut, c = i % kStagedOut;
    s.wo[n][c] = from_f32<T>(c < staged && n0 + n < p.N ? (float)p.w[(int64_t)(n0 + n) * p.K + p.list[c]] : 0.f);
  }
  for (int i = threadIdx.x; i < kBN; i += kThreads) {
    const bool live = n0 + i < p.N;
    s.scb[i] = live ? p.scb[n0 + i] : 0.f;
    s.bias[i] = live && p.bias ? to_f32(static_cast<const T*>(p.bias)[n0 + i]) : 0.f;
  }
  for (int i = threadIdx.x; i < kBM; i += kThreads) s.ra[i] = m0 + i < p.M ? p.row_absmax[m0 + i] * kInv127sq : 0.f;
}

__device__ __forceinline__ uint32_t ld_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Outputs from the accumulators: per n8 block j, the outlier part of the staged columns as one or two
// mma.m16n8k16 (x's values as A, W's columns as B) into the accumulators' positions, the rest of the outlier
// columns (past kStagedOut) from global memory, then scales and bias; two adjacent features per store.
template <typename T>
__device__ __forceinline__ void store_tile(const I8WgArgs& p, const I8Smem<T>& s, const int* acc, int m0, int n0,
                                           int cnt) {
  const int ct = threadIdx.x - 128, lane = ct & 31, g = lane >> 2, t = lane & 3;  // ct: consumer thread
  const int r0 = (ct >> 7) * 64 + ((ct >> 5) & 3) * 16 + g;  // tokens r0, r0 + 8 of the tile
  const int steps = (min(cnt, kStagedOut) + 15) / 16;
  uint32_t xa[2][4];
#pragma unroll
  for (int kc = 0; kc < 2; ++kc)
#pragma unroll
    for (int i = 0; i < 4; ++i) xa[kc][i] = ld_u32(&s.xo[r0 + 8 * (i & 1)][16 * kc + 8 * (i >> 1) + 2 * t]);
  const bool pairs = p.N % 2 == 0 && (uintptr_t)p.out % 4 == 0;
  T* out = static_cast<T*>(p.out);
#pragma unroll  // whole: acc is indexed by j and must stay in registers
  for (int j = 0; j < kBN / 8; ++j) {
    float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kc = 0; kc < 2; ++kc)
      if (kc < steps)
        mma16816<T>(o, xa[kc], ld_u32(&s.wo[8 * j + g][16 * kc + 2 * t]),
                    ld_u32(&s.wo[8 * j + g][16 * kc + 8 + 2 * t]));
    const int nl = 8 * j + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ml = r0 + 8 * h, m = m0 + ml;
      if (m >= p.M) continue;
      float v[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int n = n0 + nl + c;
        float oc = o[2 * h + c];
        for (int k = kStagedOut; k < cnt && n < p.N; ++k)
          oc += to_f32(outlier_x<T>(p, m, k)) * (float)p.w[(int64_t)n * p.K + p.list[k]];
        v[c] = (float)acc[4 * j + 2 * h + c] * s.ra[ml] * s.scb[nl + c] + oc * s.scb[nl + c] * (1.f / 127.f) +
               s.bias[nl + c];
      }
      const int n = n0 + nl;
      if (pairs && n + 1 < p.N) {
        *reinterpret_cast<uint32_t*>(out + (int64_t)m * p.N + n) = pack_pair<T>(v[0], v[1]);
      } else {
        if (n < p.N) out[(int64_t)m * p.N + n] = from_f32<T>(v[0]);
        if (n + 1 < p.N) out[(int64_t)m * p.N + n + 1] = from_f32<T>(v[1]);
      }
    }
  }
}

// A consumer warpgroup: k-tile by k-tile, its four wgmmas once the stage is full, the stage released once they
// completed; then the epilogue.
template <typename T>
__device__ __forceinline__ void consume(const I8WgArgs& p, I8Smem<T>& side, uint8_t* ring, int m0, int n0, int nk,
                                        int cnt) {
  // Zeroed one register at a time: with plain `= 0` nvcc copies one zero register into all of them and into the loop
  // counter, and ptxas then serializes the wgmmas (C7514: the counter reads an accumulator mid-pipeline).
  int acc[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) asm volatile("mov.b32 %0, 0;" : "=r"(acc[i]));
  const int a_off = ((threadIdx.x >> 7) - 1) * 64 * 128;  // this consumer's 64 q rows
  for (int kt = 0; kt < nk; ++kt) {
    const int st = kt % kS;
    bar_wait(&side.full[st], (kt / kS) & 1);
    uint8_t* stage = ring + st * kStage;
    const uint64_t a = sw128_desc(stage + a_off), b = sw128_desc(stage + kBM * 128);
    wg_fence();
#pragma unroll
    for (int s = 0; s < kBK / 32; ++s) wgmma_s8(acc, a + 2 * s, b + 2 * s);
    wg_commit();
    wg_wait<1>();  // this warpgroup's wgmmas of k-tile kt - 1 are done: release its stage
    if (kt > 0 && threadIdx.x % 128 == 0) bar_arrive(&side.empty[(kt - 1) % kS]);
  }
  wg_wait<0>();
  store_tile<T>(p, side, acc, m0, n0, cnt);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    int8_wgmma(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tw, const I8WgArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t sbase = smem_u32(smem_raw);
  uint8_t* ring = smem_raw + (((sbase + 1023) & ~1023u) - sbase);  // the swizzle atom is 1024-byte aligned
  I8Smem<T>& side = *reinterpret_cast<I8Smem<T>*>(ring + kS * kStage);
  int m0, n0;
  band_tile(p.mtiles, p.ntiles, kBM, kBN, m0, n0);
  const int nk = p.K / kBK, cnt = *p.count;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < kS; ++st) {
      bar_init(&side.full[st], 1);
      bar_init(&side.empty[st], 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    for (int kt = 0; kt < kS && kt < nk; ++kt) load_stage(ring, side.full, &tq, &tw, kt, m0, n0);
  }
  stage_side<T>(p, side, m0, n0, min(cnt, kStagedOut));
  __syncthreads();
  if (threadIdx.x < 128) {  // producer warpgroup: one thread refills each stage once both consumers released it
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == 0)
      for (int kt = kS; kt < nk; ++kt) {
        bar_wait(&side.empty[kt % kS], (kt / kS - 1) & 1);
        load_stage(ring, side.full, &tq, &tw, kt, m0, n0);
      }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    consume<T>(p, side, ring, m0, n0, nk, cnt);
  }
#endif
}

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// The driver's cuTensorMapEncodeTiled through the runtime (the library does not link libcuda), or null.
inline EncodeTiled encoder() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// Tensor map of an int8 [rows, K] row-major matrix in boxes of 128 k x box_rows rows, 128-byte swizzle (the wgmma
// layout), rows past the end zero-filled.
inline bool tile_map(CUtensorMap* map, const int8_t* base, int rows, int K, int box_rows) {
  const EncodeTiled encode = encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)K, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)K};
  const cuuint32_t box[2] = {(cuuint32_t)kBK, (cuuint32_t)box_rows};
  const cuuint32_t unit[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(base), dims, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T>
cudaError_t launch_int8_wgmma(I8WgArgs p, cudaStream_t stream) {
  static signed char here[64] = {};
  static bool ready[64] = {};
  if (!runs_here(int8_wgmma<T>, here)) return cudaErrorNotSupported;
  CUtensorMap tq, tw;
  if (!tile_map(&tq, p.q, p.M, p.K, kBM) || !tile_map(&tw, p.w, p.N, p.K, kBN)) return cudaErrorNotSupported;
  const cudaError_t err = allow_smem(int8_wgmma<T>, i8_smem<T>(), ready);
  if (err != cudaSuccess) return err;
  p.mtiles = (p.M + kBM - 1) / kBM;
  p.ntiles = (p.N + kBN - 1) / kBN;
  int8_wgmma<T><<<(unsigned)p.mtiles * (unsigned)p.ntiles, kThreads, i8_smem<T>(), stream>>>(tq, tw, p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// LLM.int8() product and epilogue in one launch: arguments as shardq_int8_epilogue with the prepared activations q
// ([M, K] int8, outlier columns zeroed) in place of the int32 product. Returns cudaErrorNotSupported, launching
// nothing, unless: the device is compute capability 9.0 with this library's sm_90a code, dtype fp16/bf16,
// K % 128 == 0, q and w 16-byte aligned, 0 <= xo_cap, and fewer than 2^31 CTAs of 128 x 256 outputs.
SHARDQ_API int shardq_int8_gemm_wgmma(const void* q, const float* row_absmax, const void* xo, int64_t xo_cap,
                                      const void* x, const void* w, const float* scb, const int* list,
                                      const int* count, const void* bias, void* out, int64_t M, int64_t N, int64_t K,
                                      int dtype, void* stream_ptr) {
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= INT32_MAX && N >= 1 && N <= INT32_MAX &&
                  K >= kBK && K <= INT32_MAX && K % kBK == 0 && xo_cap >= 0 && xo_cap <= INT32_MAX &&
                  ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN) <= INT32_MAX &&
                  (uintptr_t)q % 16 == 0 && (uintptr_t)w % 16 == 0;
  if (!ok) return cudaErrorNotSupported;
  I8WgArgs p{};
  static_cast<Int8Args&>(p) = Int8Args{static_cast<const int8_t*>(q), row_absmax, x, static_cast<const int8_t*>(w),
                                       scb, list, count, bias, out, (int)M, (int)N, (int)K};
  p.xo = xo;
  p.xo_cap = (int)xo_cap;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  SHARDQ_DISPATCH_16(dtype, T, return launch_int8_wgmma<T>(p, stream));
  return cudaErrorNotSupported;
}
