// Blockwise 4-bit quantization (used when loading): absmax of each `blocksize` run of flattened elements,
// then each element -> index of the nearest entry of the 16-value code for clamp(x * (1/absmax), -1, 1), two
// codes per byte with the first element in the high nibble. Any blocksize and numel (bytes may straddle
// blocks; an odd numel pads the last low nibble with the code of 0.0).
#include "common.cuh"

namespace shardq {
namespace {

// One warp per block: absmax over its elements.
template <typename T>
__global__ void block_absmax(const T* __restrict__ a, float* __restrict__ absmax, int64_t numel, int64_t blocksize,
                             int64_t nblocks) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
  for (int64_t b = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32; b < nblocks; b += warps) {
    const int64_t start = b * blocksize;
    const int64_t end = start + blocksize < numel ? start + blocksize : numel;
    float m = 0.f;
    for (int64_t e = start + lane; e < end; e += 32) m = fmaxf(m, fabsf(to_f32(a[e])));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) absmax[b] = m;
  }
}

// Rounding as the reference does it (shardq/quant/blockwise.py nearest_code, which follows bitsandbytes' CUDA
// kernels): FP4 by magnitude against bitsandbytes' threshold literals plus the sign bit (tiny negatives become
// -0); any other code (NF4) by stable-sorted entries and fp32 midpoints, a value on a midpoint taking the
// lower entry.
__constant__ float kFp4Raw[16] = {0.f, 0.0625f, 8.f, 12.f, 4.f, 6.f, 2.f, 3.f,
                                  -0.f, -0.0625f, -8.f, -12.f, -4.f, -6.f, -2.f, -3.f};
__constant__ float kFp4Thresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
                                        0.4166667f, 0.583333f, 0.8333333f};
__constant__ int kFp4MagnitudeCodes[8] = {0, 1, 6, 7, 4, 5, 2, 3};

struct SortedCode {
  float mids[15];
  int order[16];
  bool fp4;
};

__device__ void prepare_code(const float* code, SortedCode& sc) {
  float c[16];
  bool fp4 = true;
  for (int i = 0; i < 16; ++i) {
    c[i] = code[i];
    sc.order[i] = i;
    fp4 = fp4 && c[i] == kFp4Raw[i] / 12.f;
  }
  sc.fp4 = fp4;
  for (int i = 1; i < 16; ++i) {  // stable insertion sort of indices by value
    const int v = sc.order[i];
    int j = i - 1;
    while (j >= 0 && c[sc.order[j]] > c[v]) { sc.order[j + 1] = sc.order[j]; --j; }
    sc.order[j + 1] = v;
  }
  for (int i = 0; i < 15; ++i) sc.mids[i] = (c[sc.order[i]] + c[sc.order[i + 1]]) / 2.f;
}

__device__ __forceinline__ int nearest_code(float v, const SortedCode& sc) {
  int idx = 0;
  if (sc.fp4) {
    const float a = fabsf(v);
#pragma unroll
    for (int i = 0; i < 7; ++i) idx += kFp4Thresholds[i] < a;
    return kFp4MagnitudeCodes[idx] + (v < 0.f ? 8 : 0);
  }
#pragma unroll
  for (int i = 0; i < 15; ++i) idx += sc.mids[i] < v;
  return sc.order[idx];
}

template <typename T>
__global__ void pack4(const T* __restrict__ a, const float* __restrict__ absmax, const float* __restrict__ code,
                      uint8_t* __restrict__ packed, int64_t numel, int64_t blocksize, int64_t nbytes) {
  __shared__ SortedCode cs;
  if (threadIdx.x == 0) prepare_code(code, cs);
  __syncthreads();
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nbytes; b += (int64_t)gridDim.x * blockDim.x) {
    int nib[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t e = 2 * b + h;
      float v = 0.f;  // an odd tail is padded with a quantized 0.0, as in the reference
      if (e < numel) {
        const float inv = 1.f / fmaxf(absmax[e / blocksize], 1e-38f);
        v = fminf(fmaxf(to_f32(a[e]) * inv, -1.f), 1.f);
      }
      nib[h] = nearest_code(v, cs);
    }
    packed[b] = (uint8_t)((nib[0] << 4) | nib[1]);
  }
}

}  // namespace
}  // namespace shardq

using namespace shardq;

// packed[ceil(numel/2)], absmax[ceil(numel/blocksize)] from a contiguous fp16/bf16/fp32 tensor.
SHARDQ_API int shardq_quantize_4bit(const void* a, const float* code, void* packed, float* absmax, int64_t numel,
                                    int64_t blocksize, int dtype, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (numel <= 0) return cudaSuccess;
  if (blocksize <= 0) return cudaErrorInvalidValue;
  const int64_t nblocks = (numel + blocksize - 1) / blocksize, nbytes = (numel + 1) / 2;
  SHARDQ_DISPATCH_ALL(dtype, T, {
    block_absmax<T><<<grid_1d(nblocks, 8), 256, 0, stream>>>(static_cast<const T*>(a), absmax, numel, blocksize, nblocks);
    pack4<T><<<grid_1d(nbytes, 256), 256, 0, stream>>>(static_cast<const T*>(a), absmax, code,
                                                       static_cast<uint8_t*>(packed), numel, blocksize, nbytes);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}
