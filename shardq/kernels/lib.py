"""Lazy, soft loading of the kernels library through ctypes.

`load()` builds (or finds in the cache) and loads the library on first use only. If that fails (no nvcc, a
compiler error, a library that will not load) it warns once with the reason, including the compiler's output,
remembers the failure and returns None: callers then use the reference implementation.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

from shardq.kernels import build

ABI_VERSION = 1
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F32 = ctypes.c_float

# name -> argument types (every launcher returns a cudaError_t as int; stream is the last argument)
SIGNATURES: dict[str, list] = {
    "shardq_gemm_4bit_small": [_P, _P, _P, _P, _P, _P, _F32, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_gemm_4bit_tc": [_P, _P, _P, _P, _P, _P, _F32, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_gemm_4bit_gemv": [_P, _P, _P, _P, _P, _P, _F32, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_gemm_4bit_flat": [_P, _P, _P, _P, _P, _P, _F32, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_gemm_4bit_f32": [_P, _P, _P, _P, _P, _P, _F32, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_gemm_4bit_gemv_split": [_P, _P, _P, _P, _P, _P, _F32, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_gemm_4bit_tc_split": [_P, _P, _P, _P, _P, _P, _F32, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_gemm_4bit_wgmma": [_P, _P, _P, _P, _P, _P, _F32, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_grouped_gemm_4bit": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT, _P],
    "shardq_dequantize_4bit": [_P, _P, _P, _P, _P, _F32, _P, _P, _I64, _I64, _I64, _INT, _P],
    "shardq_quantize_4bit": [_P, _P, _P, _P, _I64, _I64, _INT, _P],
    "shardq_quantize_int8_rowwise": [_P, _P, _P, _I64, _I64, _INT, _P],
    "shardq_int8_prepare": [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _F32, _INT, _P],
    "shardq_int8_gemv_fused": [_P, _P, _P, _P, _P, _I64, _I64, _I64, _F32, _INT, _P],
    "shardq_int8_gemv": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _INT, _P],
    "shardq_int8_gemm_tc": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _INT, _P],
    "shardq_int8_epilogue": [_P, _I64, _P, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _INT, _P],
}

CUDA_ERROR_NOT_SUPPORTED = 801  # cudaErrorNotSupported: a launcher's preconditions do not hold, nothing launched

_lock = threading.Lock()
_state: dict = {"lib": None, "error": None, "tried": False, "path": None}


class KernelError(RuntimeError):
    """A kernel launch reported a CUDA error."""


def _open(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    version = lib.shardq_abi_version()
    if version != ABI_VERSION:
        raise OSError(f"{path} has ABI version {version}, this shardq expects {ABI_VERSION}")
    lib.shardq_error_string.restype = ctypes.c_char_p
    lib.shardq_error_string.argtypes = [_INT]
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = _INT
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None (after one warning) if it cannot be used."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        try:
            if os.environ.get("SHARDQ_DISABLE_KERNELS") == "1":
                raise build.BuildError("disabled by SHARDQ_DISABLE_KERNELS=1")
            path = build.built_library()
            _state["lib"] = _open(str(path))
            _state["path"] = str(path)
        except (build.BuildError, OSError, AttributeError, ValueError, TimeoutError) as exc:
            _state["error"] = str(exc)
            warnings.warn(
                f"shardq CUDA kernels unavailable, using the PyTorch reference ops instead: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )
        _state["tried"] = True
    return _state["lib"]


def error() -> str | None:
    """Why the library could not be used (None if it loaded or was never tried)."""
    return _state["error"]


def path() -> str | None:
    return _state["path"]


def check(rc: int, name: str) -> None:
    """Raise KernelError naming the launcher if it returned a CUDA error."""
    if rc != 0:
        lib = _state["lib"]
        msg = lib.shardq_error_string(rc).decode() if lib is not None else f"error {rc}"
        raise KernelError(f"shardq kernel {name} failed: {msg} (CUDA error {rc})")


def reset_for_tests() -> None:
    """Forget the load attempt (tests that exercise the failure path)."""
    with _lock:
        _state.update(lib=None, error=None, tried=False, path=None)
