// Thin binding: ABI version and error strings for the ctypes loader (shardq/kernels/lib.py).
#include "common.cuh"

SHARDQ_API int shardq_abi_version() { return 1; }

SHARDQ_API const char* shardq_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
