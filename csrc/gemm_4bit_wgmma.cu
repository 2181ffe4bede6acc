// 4-bit (nf4/fp4, optional double quant) matmul for prefill-sized batches on Hopper (sm_90a): out = x @ W.T + bias
// with the weights dequantized in registers and fed to the warpgroup tensor-core MMA (wgmma), so no dequantized
// copy of W is written to global memory and the GEMM runs on the same tensor-core path as cuBLAS's fp16 GEMM.
//
// Operands (D^T = W x^T): W is wgmma's A operand, taken from registers (the "RS" form): a warpgroup's four warps
// each hold 16 output rows x 16 k per m64 tile, in the mma.m16n8k16 A-fragment layout (g = lane >> 2,
// t = lane & 3: reg0 = (row g, k 2t..2t+1), reg1 = (row g + 8, same k), reg2 = (row g, k 2t+8..2t+9), reg3 =
// (row g + 8, ...)). x is B, read by the tensor cores from shared memory through a matrix descriptor: BT token rows
// of 64 k (128 bytes each), K-major, in the 128-byte swizzle (16-byte unit c of row m at c ^ (m & 7)); a k16 step
// moves the descriptor's start 32 bytes. D: per m64 tile and n8 column block j, d[4j + c] = (row g + 8 (c >> 1),
// token 8j + 2t + (c & 1)).
//
// Dequantization: step s of a 64-column k-tile needs weight bytes 8s + t and 8s + t + 4 of each of the lane's rows,
// i.e. byte t of words 2s and 2s + 1: one 64-bit shared load per row and step, one PRMT per byte forming the lookup
// offset (lane * 4 in byte 0, the weight byte in byte 1) into a lane-private 256-entry pair table (byte -> both
// codes as a 16-bit pair; conflict-free), one packed multiply by the row's block absmax (a 64-column k-tile lies
// inside one block: K % 64 == 0, blocksize a power of two >= 64).
//
// Schedule: 256 threads = two warpgroups, each owning MT m64 row tiles; a CTA owns BN = 128 MT output features x BT
// tokens and walks K through an S-stage cp.async ring (S - 1 k-tiles in flight). Per k-tile kt: the 4 MT wgmmas of
// kt from A fragments built during kt - 1 (one commit group), wait until kt - 1's group is done (its A buffer and
// ring stage are free), wait for kt + 1's copies, barrier, refill kt - 1's stage with kt + S - 1, then build kt + 1's
// fragments into the other A buffer while kt's wgmmas run. The buffer index must be a compile-time constant (an
// indexed register array would go to local memory), so the loop is unrolled by two. cp.async writes through the
// generic proxy, so each thread fences them to the async proxy (which wgmma reads through) before the barrier.
// Rows past M or N are not copied: their stale shared memory only reaches accumulator rows and columns that are
// never stored. Tiles are rastered in bands of token tiles (band_tile), so CTAs sharing a weight tile run together.
// Grids too small for the GPU split K (grid.y runs of k-tiles, fp32 partials, wg_sum adds them in order).
//
// Measured (H200, bench/RESULTS.md): ~440 TFLOP/s at large M, limited by the dequantization (shared-memory traffic
// and latency at 2 warps per scheduler), so the op routes only 32 < M <= 128 here.
#include <type_traits>

#include "wgmma.cuh"

#pragma nv_diag_suppress 177  // the kernel body is compiled only for sm_90a: other passes leave constants unused

namespace shardq {
namespace {

constexpr int kBK = 64;    // k per ring stage: one 128-byte swizzle row of x

// Pair table, lane-private, laid out so that one PRMT forms a lookup's byte offset: the entry of (byte b, lane l) at
// b * 256 + l * 4 (half of each 256-byte row unused), i.e. byte 0 of the offset is l * 4 and byte 1 is b.
constexpr int kWideTableWords = 256 * 64;

template <typename T, int kThreads>
__device__ __forceinline__ void fill_wide_table(uint32_t* table, const float* code) {
  for (int i = threadIdx.x; i < 256 * 32; i += kThreads)
    table[(i >> 5) * 64 + (i & 31)] = pack_pair<T>(__ldg(code + (i >> 9)), __ldg(code + ((i >> 5) & 15)));
}

// splits > 1: CTA (tile, z) walks the z-th of `splits` equal runs of k-tiles and writes its fp32 partial sums to
// ws[z][M][N]; wg_sum adds them in order (deterministic) with the bias.
struct WgArgs : Gemm4Args {
  float* ws;
  int splits, mtiles, ntiles;
};

// WG warpgroups per CTA, MT m64 row tiles per warpgroup, BT tokens per CTA, S ring stages.
template <int WG, int MT_, int BT_, int S_>
struct WgCfg {
  static constexpr int MT = MT_, BT = BT_, S = S_;
  static constexpr int kThreads = 128 * WG;
  static constexpr int BN = WG * 64 * MT;      // output features per CTA
  static constexpr int kXBytes = BT * 128;     // x tile per stage (a multiple of the 1024-byte swizzle atom)
  static constexpr int kWBytes = BN * kBK / 2;  // packed weights per stage
  static constexpr int kStage = kXBytes + kWBytes;
  static constexpr int kXCopies = BT * 8 / kThreads;
  static constexpr int kWCopies = BN * 2 / kThreads;
  static constexpr size_t smem() { return 1024 + (size_t)S * kStage + (size_t)(kWideTableWords + 256) * 4; }
  static_assert(kStage % 1024 == 0 && BT * 8 % kThreads == 0 && BN * 2 % kThreads == 0, "tile shape");
};

#define SHARDQ_ACC8(d, i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define SHARDQ_ACC32(d) SHARDQ_ACC8(d, 0), SHARDQ_ACC8(d, 8), SHARDQ_ACC8(d, 16), SHARDQ_ACC8(d, 24)
#define SHARDQ_ACC64(d) SHARDQ_ACC32(d), SHARDQ_ACC8(d, 32), SHARDQ_ACC8(d, 40), SHARDQ_ACC8(d, 48), SHARDQ_ACC8(d, 56)
#define SHARDQ_REGS32                                                                                  \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define SHARDQ_REGS64                                                                                       \
  SHARDQ_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
                "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// d (fp32, accumulated) += A (registers) x B (descriptor): one m64 x N x k16 step; TY is the PTX operand type, P / A /
// B the operand numbers of the scale-d flag, the A registers and the descriptor after the N / 2 accumulators.
#define SHARDQ_WGMMA_RS(T, TY, N, REGS, ACC, P, A, B)                                                   \
  template <>                                                                                           \
  __device__ __forceinline__ void wgmma_rs<T, N>(float* d, const uint32_t* a, uint64_t b) {             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                          \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" REGS "}, " A ", " B    \
                 ", p, 1, 1, 0;\n}\n"                                                                   \
                 : ACC(d)                                                                               \
                 : "r"(1), "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                        \
  }

template <typename T, int N> __device__ __forceinline__ void wgmma_rs(float* d, const uint32_t* a, uint64_t b);
SHARDQ_WGMMA_RS(__half, "f16", 64, SHARDQ_REGS32, SHARDQ_ACC32, "%32", "{%33, %34, %35, %36}", "%37")
SHARDQ_WGMMA_RS(__nv_bfloat16, "bf16", 64, SHARDQ_REGS32, SHARDQ_ACC32, "%32", "{%33, %34, %35, %36}", "%37")
SHARDQ_WGMMA_RS(__half, "f16", 128, SHARDQ_REGS64, SHARDQ_ACC64, "%64", "{%65, %66, %67, %68}", "%69")
SHARDQ_WGMMA_RS(__nv_bfloat16, "bf16", 128, SHARDQ_REGS64, SHARDQ_ACC64, "%64", "{%65, %66, %67, %68}", "%69")

// This thread's cp.async copies: x rows tid / 8 + R j with R = threads / 8 (16-byte unit tid % 8, the same swizzled
// position in every row of the copy) and packed weight rows tid / 2 + 4 R j (half tid % 2), each source a pointer
// that moves one k-tile per issue (tiles are issued in order). Rows past M or N are masked out.
template <typename T, class C>
struct Loader {
  static constexpr int R = C::kThreads / 8;
  const T* x[C::kXCopies];
  const uint8_t* w[C::kWCopies];
  uint32_t xdst, wdst, xmask, wmask;

  __device__ __forceinline__ void init(const WgArgs& p, int m0, int n0, int kt0) {
    const int tid = threadIdx.x, m = tid >> 3, c = tid & 7, r = tid >> 1;
    xmask = wmask = 0;
#pragma unroll
    for (int j = 0; j < C::kXCopies; ++j) {
      x[j] = static_cast<const T*>(p.x) + (int64_t)(m0 + m + R * j) * p.K + kt0 * kBK + c * 8;
      xmask |= (m0 + m + R * j < p.M ? 1u : 0u) << j;
    }
#pragma unroll
    for (int j = 0; j < C::kWCopies; ++j) {
      w[j] = p.w + (int64_t)(n0 + r + 4 * R * j) * (p.K / 2) + kt0 * (kBK / 2) + (tid & 1) * 16;
      wmask |= (n0 + r + 4 * R * j < p.N ? 1u : 0u) << j;
    }
    xdst = m * 128 + ((c ^ (m & 7)) << 4);
    wdst = C::kXBytes + r * 32 + (tid & 1) * 16;
  }

  // Copy the next k-tile into the ring stage at dst.
  __device__ __forceinline__ void issue(uint8_t* dst) {
#pragma unroll
    for (int j = 0; j < C::kXCopies; ++j) {
      if (xmask >> j & 1) cp_async16(dst + xdst + j * R * 128, x[j]);
      x[j] += kBK;
    }
#pragma unroll
    for (int j = 0; j < C::kWCopies; ++j) {
      if (wmask >> j & 1) cp_async16(dst + wdst + j * 4 * R * 32, w[j]);
      w[j] += kBK / 2;
    }
  }
};

// One warp's part: rows, accumulators, block scales and the A fragments of two k-tiles (the one whose wgmmas run,
// the next one being built).
template <typename T, int MT, int BT>
struct WgWarp {
  static constexpr int kSteps = kBK / 16;
  int base, g, t, lane;
  uint32_t lane4, sel;  // lookup offset byte 0 (lane * 4); PRMT selector: byte 0 <- lane4, byte 1 <- byte t, 0 above
  const char* table;
  float acc[MT][BT / 2];
  AbsRaw raw;
  uint32_t s2[MT][2];
  uint32_t a[2][kSteps][MT][4];

  __device__ __forceinline__ void init(const uint32_t* pair_table) {
    const int warp = threadIdx.x >> 5;
    lane = threadIdx.x & 31;
    base = (warp >> 2) * 64 * MT + (warp & 3) * 16;
    g = lane >> 2;
    t = lane & 3;
    lane4 = lane * 4;
    sel = 0x5504u | (t << 4);
    table = reinterpret_cast<const char*>(pair_table);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < BT / 2; ++i) acc[mt][i] = 0.f;
  }

  // CTA-local row of (m64 tile mt, half h) for this lane.
  __device__ __forceinline__ int row(int mt, int h) const { return base + mt * 64 + 8 * h + g; }

  // Lane t fetches the raw absmax of its row number t (of the 2 MT it uses) for k-tile kt.
  __device__ __forceinline__ void prefetch(const WgArgs& p, int n0, int kt) {
    const int n = n0 + row((t >> 1) % MT, t & 1);
    raw = fetch_abs(p.am, p.bs_shift, n < p.N, (int64_t)n * p.K + kt * kBK);
  }

  __device__ __forceinline__ void scales(const WgArgs& p, const float* ncode) {
    const float own = decode_abs(p.am, ncode, raw);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float s = __shfl_sync(0xffffffffu, own, (lane & ~3) | (mt << 1) | h);
        s2[mt][h] = pack_pair<T>(s, s);
      }
  }

  // Byte t of word wd as its two scaled 16-bit codes: one PRMT, one lookup, one packed multiply.
  __device__ __forceinline__ uint32_t pair(uint32_t wd, uint32_t scale) const {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(table + __byte_perm(wd, lane4, sel));
    return scale_pair<T>(v, scale);
  }

  // A fragments of a whole k-tile into buffer buf: step s reads weight words 2s, 2s + 1 of each of the lane's rows.
  __device__ __forceinline__ void build(const uint8_t* ws, int buf) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint2 u0 = *reinterpret_cast<const uint2*>(ws + row(mt, 0) * 32 + s * 8);
        const uint2 u1 = *reinterpret_cast<const uint2*>(ws + row(mt, 1) * 32 + s * 8);
        a[buf][s][mt][0] = pair(u0.x, s2[mt][0]);
        a[buf][s][mt][1] = pair(u1.x, s2[mt][1]);
        a[buf][s][mt][2] = pair(u0.y, s2[mt][0]);
        a[buf][s][mt][3] = pair(u1.y, s2[mt][1]);
      }
  }

  // The wgmmas of a k-tile (A buffer buf, x tile at desc), one commit group.
  __device__ __forceinline__ void mma(uint64_t desc, int buf) {
    wg_fence();
#pragma unroll
    for (int s = 0; s < kSteps; ++s)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) wgmma_rs<T, BT>(acc[mt], a[buf][s][mt], desc + 2 * s);  // +32 bytes a step
    wg_commit();
  }

  // acc[mt][4j + c] is (feature row(mt, c >> 1), token 8j + 2t + (c & 1)): f(m, n, value + add(n)) for each in
  // range, add(n) read once per feature.
  template <typename A, typename F>
  __device__ __forceinline__ void each_out(const WgArgs& p, int m0, int n0, A&& add, F&& f) const {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + row(mt, h);
        if (n >= p.N) continue;
        const float b = add(n);
#pragma unroll
        for (int j = 0; j < BT / 8; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int m = m0 + 8 * j + 2 * t + c;
            if (m < p.M) f(m, n, acc[mt][4 * j + 2 * h + c] + b);
          }
      }
  }

  // Bias added in fp32, one rounding. With splits, the partial sums go to ws[z] as they are.
  __device__ __forceinline__ void store(const WgArgs& p, int m0, int n0) const {
    if (p.splits > 1) {
      float* ws = p.ws + (int64_t)blockIdx.y * p.M * p.N;
      each_out(p, m0, n0, [](int) { return 0.f; }, [&](int m, int n, float v) { ws[(int64_t)m * p.N + n] = v; });
      return;
    }
    T* out = static_cast<T*>(p.out);
    const T* bias = static_cast<const T*>(p.bias);
    each_out(p, m0, n0, [&](int n) { return bias ? to_f32(bias[n]) : 0.f; },
             [&](int m, int n, float v) { out[(int64_t)m * p.N + n] = from_f32<T>(v); });
  }
};

// out = sum over z of ws[z] (in order) + bias.
template <typename T>
__global__ void wg_sum(const float* ws, const T* bias, T* out, int64_t M, int64_t N, int splits) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    float v = bias ? to_f32(bias[i % N]) : 0.f;
    for (int z = 0; z < splits; ++z) v += ws[z * total + i];
    out[i] = from_f32<T>(v);
  }
}

template <typename T, class C>
__global__ void __launch_bounds__(C::kThreads, 1) gemm4_wgmma(WgArgs p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int MT = C::MT, BT = C::BT, S = C::S;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint32_t* table = reinterpret_cast<uint32_t*>(smem_raw);  // first: lookups address it as base + PRMT result
  float* ncode = reinterpret_cast<float*>(table + kWideTableWords);
  uint8_t* after = reinterpret_cast<uint8_t*>(ncode + 256);
  const uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(after));
  uint8_t* ring = after + (((sbase + 1023) & ~1023u) - sbase);  // the swizzle atom is 1024-byte aligned
  int m0, n0;
  band_tile(p.mtiles, p.ntiles, BT, C::BN, m0, n0);
  const int nkt = p.K / kBK, k0 = (int)((int64_t)nkt * blockIdx.y / p.splits);
  const int nk = (int)((int64_t)nkt * (blockIdx.y + 1) / p.splits) - k0;  // this CTA's k-tiles: k0 .. k0 + nk - 1
  Loader<T, C> ld;
  ld.init(p, m0, n0, k0);
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (st < nk) ld.issue(ring + st * C::kStage);
    cp_async_commit();
  }
  fill_wide_table<T, C::kThreads>(table, p.code);
  if (!p.am.plain && threadIdx.x < 256) ncode[threadIdx.x] = __ldg(p.am.nested_code + threadIdx.x);
  WgWarp<T, MT, BT> w;
  w.init(table);
  w.prefetch(p, n0, k0);
  cp_async_wait<S - 2>();
  fence_to_async();
  __syncthreads();
  w.scales(p, ncode);
  w.build(ring + C::kXBytes, 0);
  if (nk > 1) w.prefetch(p, n0, k0 + 1);
  // One k-tile: its wgmmas from A buffer B (a constant, so the fragments stay in registers), then the next
  // k-tile's fragments built into the other buffer.
  auto tile = [&](int kt, auto buf) {
    constexpr int B = decltype(buf)::value;
    w.mma(sw128_desc(ring + (kt % S) * C::kStage), B);
    wg_wait<1>();  // this warpgroup's wgmmas of k-tile kt - 1 are done: its A buffer and ring stage are free
    cp_async_wait<S - 3>();  // k-tile kt + 1 has landed
    fence_to_async();
    __syncthreads();
    if (kt + S - 1 < nk) ld.issue(ring + ((kt + S - 1) % S) * C::kStage);  // into k-tile kt - 1's stage
    cp_async_commit();
    if (kt + 1 < nk) {
      w.scales(p, ncode);
      w.build(ring + ((kt + 1) % S) * C::kStage + C::kXBytes, 1 - B);
      if (kt + 2 < nk) w.prefetch(p, n0, k0 + kt + 2);
    }
  };
  for (int kt = 0; kt < nk; kt += 2) {
    tile(kt, std::integral_constant<int, 0>());
    if (kt + 1 < nk) tile(kt + 1, std::integral_constant<int, 1>());
  }
  wg_wait<0>();
  w.store(p, m0, n0);
#endif
}

template <typename T, class C>
cudaError_t launch_wgmma(WgArgs p, cudaStream_t stream) {
  static signed char here[64] = {};
  static bool ready[64] = {};
  if (!runs_here(gemm4_wgmma<T, C>, here)) return cudaErrorNotSupported;
  const cudaError_t err = allow_smem(gemm4_wgmma<T, C>, C::smem(), ready);
  if (err != cudaSuccess) return err;
  p.mtiles = (p.M + C::BT - 1) / C::BT;
  p.ntiles = (p.N + C::BN - 1) / C::BN;
  const dim3 grid((unsigned)p.mtiles * (unsigned)p.ntiles, (unsigned)p.splits);
  gemm4_wgmma<T, C><<<grid, C::kThreads, C::smem(), stream>>>(p);
  if (p.splits > 1)
    wg_sum<T><<<grid_1d((int64_t)p.M * p.N, 256, 8 * sm_count()), 256, 0, stream>>>(
        p.ws, static_cast<const T*>(p.bias), static_cast<T*>(p.out), p.M, p.N, p.splits);
  return cudaGetLastError();
}

// 64-token tiles up to M = 64, 128 above; 128 features per CTA where 256 would leave SMs idle. (Four warpgroups of
// one m64 tile each instead of two of two measured the same on an H200: the limit is not warps in flight.)
template <typename T>
cudaError_t dispatch_wgmma(const WgArgs& p, cudaStream_t stream) {
  const int64_t ctas = (int64_t)((p.M + 127) / 128) * ((p.N + 255) / 256);
  const bool narrow = p.splits > 1 || ctas < sm_count();
  if (p.M <= 64)
    return narrow ? launch_wgmma<T, WgCfg<2, 1, 64, 6>>(p, stream) : launch_wgmma<T, WgCfg<2, 2, 64, 6>>(p, stream);
  return narrow ? launch_wgmma<T, WgCfg<2, 1, 128, 5>>(p, stream) : launch_wgmma<T, WgCfg<2, 2, 128, 5>>(p, stream);
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// Arguments as shardq_gemm_4bit_tc, plus ws and splits: K is split into `splits` runs of k-tiles (for grids too
// small to fill the GPU), each CTA's fp32 partial sums written to ws (splits * M * N floats, unused when splits is
// 1) and added in order with the bias by a second launch. Returns cudaErrorNotSupported, launching nothing, unless:
// the device is compute capability 9.0 with this library's sm_90a code, dtype fp16/bf16, K % 64 == 0, blocksize a
// power of two >= 64, x and w 16-byte aligned, an absmax given, 1 <= splits <= min(K / 64, 64) with ws given when
// splits > 1, and at most 2^31 - 1 CTAs per split.
SHARDQ_API int shardq_gemm_4bit_wgmma(const void* x, const void* w, const float* absmax, const void* absmax_q,
                                      const float* nested_absmax, const float* nested_code, float offset,
                                      const float* code, const void* bias, void* out, float* ws, int64_t M,
                                      int64_t N, int64_t K, int64_t blocksize, int64_t splits, int dtype,
                                      void* stream_ptr) {
  const Gemm4Args a = Gemm4Args::of(x, w, absmax, absmax_q, nested_absmax, nested_code, offset, code, bias, out, M, N,
                                    K, blocksize);
  const bool ok = (dtype == kF16 || dtype == kBF16) && M >= 1 && M <= INT32_MAX && N >= 1 && N <= INT32_MAX &&
                  K >= kBK && K <= INT32_MAX && K % kBK == 0 && a.bs_shift >= 6 &&
                  ((M + 63) / 64) * ((N + 127) / 128) <= INT32_MAX && (uintptr_t)x % 16 == 0 &&
                  (uintptr_t)w % 16 == 0 && a.am.given() && splits >= 1 && splits <= 64 && splits <= K / kBK &&
                  (splits == 1 || ws != nullptr);
  if (!ok) return cudaErrorNotSupported;
  const WgArgs p{a, ws, (int)splits, 0, 0};
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  SHARDQ_DISPATCH_16(dtype, T, return dispatch_wgmma<T>(p, stream));
  return cudaErrorNotSupported;
}
