// What read bandwidth the 4-bit GEMV's weight-load patterns can reach with no arithmetic at all, on the GEMV's
// 8192x28672 packed weight (117 MB: 28672 rows of 4096 bytes), against a plain full-occupancy streaming read and
// a device-to-device copy in the same run. It answers whether the GEMV (52.5 us = 60 % of copy bandwidth on an
// H200) is held back by its load pattern and bytes in flight, and what a shared-memory ring would give instead.
//
// Every probe runs the GEMV's geometry: one persistent CTA per SM of 16 warps in two groups of 8, a group owning a
// 16-row tile at a time, each warp an eighth of every row of it (512 bytes), in items of 16 rows x 128 bytes.
//   regs<D>:   the GEMV's fragment pattern (lane = row g and g + 8, 16 bytes at t * 16 of each 64-byte piece),
//              D items in flight in registers (the GEMV has D = 2 at M = 1);
//   rows<D>:   the same bytes per item read as 512-byte contiguous runs of one row (4 rows x 128 B per request);
//   cpasync<S>: the fragment pattern by cp.async.cg into a warp-private ring of S items, read back from shared;
//   bulk<S,R>: cp.async.bulk (sm_90) of 16 rows x R bytes per stage into a warp-private ring of S stages.
// Build and run (one GPU, any machine with nvcc; sm_90 for the bulk probes):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 bench/load_probe.cu -o /tmp/probe && /tmp/probe
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

namespace {

constexpr int kRows = 28672, kRowBytes = 4096, kWarps = 16, kItemsPerTile = 4;  // 4 items of 128 B per row
constexpr int kTiles = kRows / 16;

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e = (x);                                                                  \
    if (e != cudaSuccess) {                                                               \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e));       \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

__device__ __forceinline__ uint4 ldw(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

struct Walk {  // a warp's items: tile = first + j / 4 * groups, 128-byte column slice wk * 4 + j % 4
  int first, groups, wk, items;
  __device__ Walk() {
    const int warp = threadIdx.x >> 5;
    groups = gridDim.x * 2;
    first = blockIdx.x * 2 + warp / 8;
    wk = warp % 8;
    items = first < kTiles ? (kTiles - first + groups - 1) / groups * kItemsPerTile : 0;
  }
  __device__ int tile(int j) const { return first + j / kItemsPerTile * groups; }
  __device__ int64_t col(int j) const { return (wk * kItemsPerTile + j % kItemsPerTile) * 128; }
};

// Lane's 4 requests of item j: fragment pattern (rows g, g + 8; pieces 0, 1) or 512-byte row runs.
template <bool kRowRuns>
__device__ __forceinline__ const uint8_t* addr(const uint8_t* w, const Walk& wk, int j, int r) {
  const int lane = threadIdx.x & 31;
  if (kRowRuns) {  // request r: rows 4r..4r+3 of the item's 16, 128 bytes each, a lane 16 bytes
    const int row = wk.tile(j) * 16 + 4 * r + lane / 8;
    return w + (int64_t)row * kRowBytes + wk.col(j) + (lane % 8) * 16;
  }
  const int g = lane >> 2, t = lane & 3, h = r & 1, q = r >> 1;
  return w + (int64_t)(wk.tile(j) * 16 + g + 8 * h) * kRowBytes + wk.col(j) + q * 64 + t * 16;
}

template <int D, bool kRowRuns>
__global__ void __launch_bounds__(32 * kWarps, 1) probe_regs(const uint8_t* __restrict__ w, uint32_t* sink) {
  const Walk wk;
  uint4 buf[D + 1][4];
  uint32_t acc = 0;
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (d < wk.items)
#pragma unroll
      for (int r = 0; r < 4; ++r) buf[d][r] = ldw(addr<kRowRuns>(w, wk, d, r));
  for (int i = 0; i < wk.items; i += D + 1) {
#pragma unroll
    for (int d = 0; d <= D; ++d) {
      if (i + d < wk.items) {
        if (i + d + D < wk.items)
#pragma unroll
          for (int r = 0; r < 4; ++r) buf[(d + D) % (D + 1)][r] = ldw(addr<kRowRuns>(w, wk, i + d + D, r));
#pragma unroll
        for (int r = 0; r < 4; ++r) acc ^= fold(buf[d][r]);
      }
    }
  }
  sink[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

template <int S>
__global__ void __launch_bounds__(32 * kWarps, 1) probe_cpasync(const uint8_t* __restrict__ w, uint32_t* sink) {
  extern __shared__ __align__(16) uint8_t smem[];
  const Walk wk;
  const int lane = threadIdx.x & 31;
  uint8_t* ring = smem + (threadIdx.x >> 5) * S * 2048;
  auto slot = [&](int j, int r) { return ring + (j % S) * 2048 + r * 512 + lane * 16; };
  auto issue = [&](int j) {
    if (j < wk.items)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(slot(j, r)));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(addr<false>(w, wk, j, r)));
      }
    asm volatile("cp.async.commit_group;");
  };
  uint32_t acc = 0;
  for (int j = 0; j < S - 1; ++j) issue(j);
  for (int j = 0; j < wk.items; ++j) {
    issue(j + S - 1);
    asm volatile("cp.async.wait_group %0;" ::"n"(S - 1));
#pragma unroll
    for (int r = 0; r < 4; ++r) acc ^= fold(*reinterpret_cast<const uint4*>(slot(j, r)));
  }
  sink[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PROBE_BULK 1
#endif

// Stage k of a warp holds 16 rows x R bytes of one tile (R / 128 items); lanes 0..15 copy one row each.
template <int S, int R>
__global__ void __launch_bounds__(32 * kWarps, 1) probe_bulk(const uint8_t* __restrict__ w, uint32_t* sink) {
#ifdef PROBE_BULK
  extern __shared__ __align__(16) uint8_t smem[];
  constexpr int kStage = 16 * (R + 16), kPer = R / 128;  // rows padded by 16 bytes
  const Walk wk;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem) + warp * S;
  uint8_t* ring = smem + 1024 + warp * S * kStage;
  const int stages = wk.items / kPer;
  if (lane < S) {
    const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bars + lane));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b));
  }
  __syncwarp();
  auto issue = [&](int k) {
    if (k >= stages) return;
    const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bars + k % S));
    if (lane == 0) asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "n"(16 * R));
    __syncwarp();
    if (lane < 16) {
      const int j = k * kPer;
      const uint8_t* src = w + (int64_t)(wk.tile(j) * 16 + lane) * kRowBytes + wk.col(j);
      const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(ring + (k % S) * kStage + lane * (R + 16)));
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(dst), "l"(src), "n"(R), "r"(b) : "memory");
    }
  };
  uint32_t acc = 0;
  for (int k = 0; k < S; ++k) issue(k);
  for (int k = 0; k < stages; ++k) {
    const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bars + k % S));
    const uint32_t parity = (k / S) & 1;
    uint32_t done = 0;
    while (!done)
      asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                   : "=r"(done) : "r"(b), "r"(parity) : "memory");
    const uint8_t* st = ring + (k % S) * kStage;
    for (int u = lane; u < R; u += 32) {  // R 16-byte units: row u / (R / 16), unit u % (R / 16)
      acc ^= fold(*reinterpret_cast<const uint4*>(st + (u / (R / 16)) * (R + 16) + (u % (R / 16)) * 16));
    }
    __syncwarp();
    issue(k + S);
  }
  sink[blockIdx.x * blockDim.x + threadIdx.x] = acc;
#endif
}

__global__ void stream_read(const uint4* __restrict__ w, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = w[i], b = w[i + stride], c = w[i + 2 * stride], d = w[i + 3 * stride];
    acc ^= fold(a) ^ fold(b) ^ fold(c) ^ fold(d);
  }
  for (; i < n; i += stride) acc ^= fold(w[i]);
  sink[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

template <typename F>
float time_us(F launch, int reps = 20) {
  for (int i = 0; i < 3; ++i) launch();
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) launch();
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  CHECK(cudaGetLastError());
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms * 1000.f / reps;
}

}  // namespace

int main() {
  int sms = 0;
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  sms = prop.multiProcessorCount;
  const size_t bytes = (size_t)kRows * kRowBytes, copy_bytes = 1ull << 30;
  uint8_t *w, *c0, *c1;
  uint32_t* sink;
  CHECK(cudaMalloc(&w, bytes));
  CHECK(cudaMalloc(&c0, copy_bytes));
  CHECK(cudaMalloc(&c1, copy_bytes));
  CHECK(cudaMalloc(&sink, (size_t)8 * sms * 1024 * 4));
  CHECK(cudaMemset(w, 0x5a, bytes));
  const float copy = time_us([&] { CHECK(cudaMemcpyAsync(c1, c0, copy_bytes, cudaMemcpyDeviceToDevice)); }, 10);
  const double copy_gbs = 2.0 * copy_bytes / copy / 1e3;
  std::printf("%s, %d SMs; HBM copy %.0f GB/s (1 GiB, read + write); weight 8192x28672 packed = %.1f MB\n",
              prop.name, sms, copy_gbs, bytes / 1e6);
  std::printf("| probe | us | GB/s | %% of copy |\n|---|---|---|---|\n");
  auto report = [&](const char* name, float us) {
    std::printf("| %s | %.1f | %.0f | %.0f %% |\n", name, us, bytes / us / 1e3, 100.0 * bytes / us / 1e3 / copy_gbs);
  };
  const int threads = 32 * kWarps;
  const int pad = 120 * 1024;  // one CTA per SM, as the GEMV (~97 KB of shared memory at M = 1, 128 registers)
  auto one_per_sm = [&](auto kernel, int smem) {
    const int s = smem > pad ? smem : pad;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, s));
    return time_us([&] { kernel<<<sms, threads, s>>>(w, sink); });
  };
  report("stream_read (8 CTAs/SM x 256 threads, 4 x 16 B per thread in flight)", time_us([&] {
           stream_read<<<8 * sms, 256>>>(reinterpret_cast<const uint4*>(w), bytes / 16, sink);
         }));
  report("regs<1> fragment", one_per_sm(probe_regs<1, false>, 0));
  report("regs<2> fragment (the GEMV at M = 1)", one_per_sm(probe_regs<2, false>, 0));
  report("regs<2> fragment, 2 CTAs per SM", time_us([&] { probe_regs<2, false><<<2 * sms, threads>>>(w, sink); }));
  report("regs<3> fragment", one_per_sm(probe_regs<3, false>, 0));
  report("regs<4> fragment", one_per_sm(probe_regs<4, false>, 0));
  report("regs<2> row runs", one_per_sm(probe_regs<2, true>, 0));
  report("regs<4> row runs", one_per_sm(probe_regs<4, true>, 0));
  report("cpasync<3>", one_per_sm(probe_cpasync<3>, kWarps * 3 * 2048));
  report("cpasync<4>", one_per_sm(probe_cpasync<4>, kWarps * 4 * 2048));
  report("cpasync<6>", one_per_sm(probe_cpasync<6>, kWarps * 6 * 2048));
  if (prop.major >= 9) {
    report("bulk<2,256>", one_per_sm(probe_bulk<2, 256>, 1024 + kWarps * 2 * 16 * (256 + 16)));
    report("bulk<3,256>", one_per_sm(probe_bulk<3, 256>, 1024 + kWarps * 3 * 16 * (256 + 16)));
    report("bulk<4,128>", one_per_sm(probe_bulk<4, 128>, 1024 + kWarps * 4 * 16 * (128 + 16)));
    report("bulk<6,128>", one_per_sm(probe_bulk<6, 128>, 1024 + kWarps * 6 * 16 * (128 + 16)));
  }
  return 0;
}
