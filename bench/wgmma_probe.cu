// Tensor-core throughput probe (H100/H200, sm_90a): back-to-back m64n256 wgmmas on operands already in shared memory,
// two warpgroups per CTA, one CTA per SM; reports dense int8 (k32) and fp16 (k16) throughput in TOPS, to tell
// whether a GEMM is limited by the tensor cores or by its feed.
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a bench/wgmma_probe.cu -o /tmp/wgmma_probe
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

#define PROBE_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21,"\
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41,"\
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61,"\
  "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81,"\
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101,"\
  "%102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118,"\
  "%119, %120, %121, %122, %123, %124, %125, %126, %127"

__device__ __forceinline__ uint64_t desc(uint32_t addr) {
  return ((uint64_t)(addr & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

template <bool kInt8>
__global__ void __launch_bounds__(256, 1) probe(int iters, int* sink) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
  const uint64_t a = desc(base + (threadIdx.x >> 7) * 8192), b = desc(base + 16384);
  int d[128];
  float f[128];
  for (int i = 0; i < 128; ++i) {
    asm volatile("mov.b32 %0, 0;" : "=r"(d[i]));
    asm volatile("mov.b32 %0, 0;" : "=f"(f[i]));
  }
  for (int it = 0; it < iters; ++it) {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    for (int s = 0; s < 4; ++s) {
      if (kInt8) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {" PROBE_REGS "}, %128, %129, p;\n}\n"
          : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
            "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
            "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]),
            "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]),
            "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]),
            "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]),
            "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]),
            "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]),
            "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]),
            "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
            "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]),
            "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]),
            "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]),
            "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]),
            "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]),
            "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]),
            "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]),
            "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
          : "l"(a + 2 * s), "l"(b + 2 * s), "r"(1));
      } else {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {" PROBE_REGS "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
          : "+f"(f[0]), "+f"(f[1]), "+f"(f[2]), "+f"(f[3]), "+f"(f[4]), "+f"(f[5]), "+f"(f[6]), "+f"(f[7]),
            "+f"(f[8]), "+f"(f[9]), "+f"(f[10]), "+f"(f[11]), "+f"(f[12]), "+f"(f[13]), "+f"(f[14]), "+f"(f[15]),
            "+f"(f[16]), "+f"(f[17]), "+f"(f[18]), "+f"(f[19]), "+f"(f[20]), "+f"(f[21]), "+f"(f[22]),
            "+f"(f[23]), "+f"(f[24]), "+f"(f[25]), "+f"(f[26]), "+f"(f[27]), "+f"(f[28]), "+f"(f[29]),
            "+f"(f[30]), "+f"(f[31]), "+f"(f[32]), "+f"(f[33]), "+f"(f[34]), "+f"(f[35]), "+f"(f[36]),
            "+f"(f[37]), "+f"(f[38]), "+f"(f[39]), "+f"(f[40]), "+f"(f[41]), "+f"(f[42]), "+f"(f[43]),
            "+f"(f[44]), "+f"(f[45]), "+f"(f[46]), "+f"(f[47]), "+f"(f[48]), "+f"(f[49]), "+f"(f[50]),
            "+f"(f[51]), "+f"(f[52]), "+f"(f[53]), "+f"(f[54]), "+f"(f[55]), "+f"(f[56]), "+f"(f[57]),
            "+f"(f[58]), "+f"(f[59]), "+f"(f[60]), "+f"(f[61]), "+f"(f[62]), "+f"(f[63]), "+f"(f[64]),
            "+f"(f[65]), "+f"(f[66]), "+f"(f[67]), "+f"(f[68]), "+f"(f[69]), "+f"(f[70]), "+f"(f[71]),
            "+f"(f[72]), "+f"(f[73]), "+f"(f[74]), "+f"(f[75]), "+f"(f[76]), "+f"(f[77]), "+f"(f[78]),
            "+f"(f[79]), "+f"(f[80]), "+f"(f[81]), "+f"(f[82]), "+f"(f[83]), "+f"(f[84]), "+f"(f[85]),
            "+f"(f[86]), "+f"(f[87]), "+f"(f[88]), "+f"(f[89]), "+f"(f[90]), "+f"(f[91]), "+f"(f[92]),
            "+f"(f[93]), "+f"(f[94]), "+f"(f[95]), "+f"(f[96]), "+f"(f[97]), "+f"(f[98]), "+f"(f[99]),
            "+f"(f[100]), "+f"(f[101]), "+f"(f[102]), "+f"(f[103]), "+f"(f[104]), "+f"(f[105]), "+f"(f[106]),
            "+f"(f[107]), "+f"(f[108]), "+f"(f[109]), "+f"(f[110]), "+f"(f[111]), "+f"(f[112]), "+f"(f[113]),
            "+f"(f[114]), "+f"(f[115]), "+f"(f[116]), "+f"(f[117]), "+f"(f[118]), "+f"(f[119]), "+f"(f[120]),
            "+f"(f[121]), "+f"(f[122]), "+f"(f[123]), "+f"(f[124]), "+f"(f[125]), "+f"(f[126]), "+f"(f[127])
          : "l"(a + 2 * s), "l"(b + 2 * s), "r"(1));
      }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  int acc = 0;
  for (int i = 0; i < 128; ++i) acc += d[i] + (int)f[i];
  if (acc == 0x7fffffff) sink[0] = acc;
}

template <bool kInt8>
void run(int sms) {
  const size_t smem = 48 * 1024;
  cudaFuncSetAttribute(probe<kInt8>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  int* sink;
  cudaMalloc(&sink, 4);
  const int iters = 4096;
  probe<kInt8><<<sms, 256, smem>>>(16, sink);
  cudaEvent_t s, e;
  cudaEventCreate(&s);
  cudaEventCreate(&e);
  cudaEventRecord(s);
  probe<kInt8><<<sms, 256, smem>>>(iters, sink);
  cudaEventRecord(e);
  cudaEventSynchronize(e);
  float ms = 0;
  cudaEventElapsedTime(&ms, s, e);
  const double macs = (double)sms * 2 * iters * 4 * 64 * 256 * (kInt8 ? 32 : 16);
  printf("%s m64n256k%d SS, 2 warpgroups x %d CTAs: %.3f ms, %.0f T(FL)OPS  (%s)\n", kInt8 ? "int8" : "fp16",
         kInt8 ? 32 : 16, sms, ms, 2 * macs / (ms * 1e-3) / 1e12, cudaGetErrorString(cudaGetLastError()));
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  run<true>(sms);
  run<false>(sms);
  run<true>(sms);
  return 0;
}
