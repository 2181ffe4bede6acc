// Hopper (sm_90a) warpgroup-MMA plumbing of the wgmma kernel (gemm_4bit_wgmma.cu):
// fences, commit/wait, the shared-memory matrix descriptor of the 128-byte swizzle, and the check that a kernel
// really runs from sm_90a code on this device.
#pragma once
#include "common.cuh"

namespace shardq {

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's completed generic-proxy shared-memory writes (cp.async) visible to the async proxy.
__device__ __forceinline__ void fence_to_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Descriptor of a K-major tile in the 128-byte swizzle (rows of 128 bytes, 16-byte unit c of row r at c ^ (r & 7),
// 1024-byte aligned 8-row groups): start address, leading offset 16 bytes (unused by this layout), stride 1024
// bytes between 8-row groups, swizzle mode 1 (128 B). Adding 2 moves the start 32 bytes along K.
__device__ __forceinline__ uint64_t sw128_desc(const void* smem) {
  const uint64_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Whether `kernel` runs here: a compute capability 9.0 device and the function built from sm_90a code (not
// JIT-compiled from an older PTX). Cached per device in `state` (one array per instantiation).
template <typename Kernel>
bool runs_here(Kernel kernel, signed char (&state)[64]) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (!state[dev]) {
    int major = 0, minor = 0;
    cudaFuncAttributes attr{};
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
                    major == 9 && minor == 0 && cudaFuncGetAttributes(&attr, kernel) == cudaSuccess &&
                    attr.binaryVersion == 90 && attr.ptxVersion >= 90;
    if (!ok) cudaGetLastError();
    state[dev] = ok ? 1 : -1;
  }
  return state[dev] > 0;
}

}  // namespace shardq
