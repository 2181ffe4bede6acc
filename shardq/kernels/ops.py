"""The `shardq::*` custom ops (torch.library). The default kernel of each op is the pure-PyTorch reference in
`shardq.formats` (CPU path and test oracle); the CUDA kernels of `cuda_ops` are registered beside it. Fake
implementations give output shapes so torch.compile and CUDA graphs can capture the ops. Importing this
module only registers Python functions: no extension is loaded and no GPU is touched.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from shardq.formats import blockwise, int8
from shardq.kernels.cuda_ops import KERNELS

_LIB = "shardq"
# The schemas of DESIGN.md, spelled out so they read `int` where inference would write `SymInt`.
_SCHEMAS = {
    "quantize_4bit": "(Tensor A, Tensor code, int blocksize) -> (Tensor packed, Tensor absmax)",
    "dequantize_4bit": "(Tensor packed, Tensor absmax, Tensor code, int blocksize, int[] shape, ScalarType dtype) -> Tensor",
    "gemm_4bit": "(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, int in_features, Tensor? nested_absmax, Tensor? nested_code, float nested_offset, Tensor? bias) -> Tensor",
    "quantize_int8_rowwise": "(Tensor A) -> (Tensor q, Tensor scale)",
    "int8_linear": "(Tensor x, Tensor weight, Tensor scale, Tensor? bias, float threshold) -> Tensor",
}


def _check_4bit_args(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, numel: int) -> None:
    """Shape/dtype checks shared by the reference and fake kernels (clear errors instead of garbage)."""
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.numel() == (numel + 1) // 2,
                 lambda: f"packed holds {packed.numel()} bytes, expected ceil({numel}/2) = {(numel + 1) // 2}")
    torch._check(absmax.numel() == blockwise.n_blocks(numel, blocksize),
                 lambda: f"absmax has {absmax.numel()} entries, expected ceil({numel}/{blocksize})")
    torch._check(code.numel() == 16 and code.dtype == torch.float32,
                 lambda: f"code must be fp32 [16], got {code.dtype} {tuple(code.shape)}")


@torch.library.custom_op(f"{_LIB}::quantize_4bit", mutates_args=(), schema=_SCHEMAS["quantize_4bit"])
def quantize_4bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Blockwise absmax quantization of A to a 16-entry code: (packed uint8 [ceil(n/2),1], absmax fp32)."""
    return blockwise.quantize_4bit_ref(A, code, blocksize)


@quantize_4bit.register_fake
def _(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    n = A.numel()
    return (A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            A.new_empty((blockwise.n_blocks(n, blocksize),), dtype=torch.float32))


@torch.library.custom_op(f"{_LIB}::dequantize_4bit", mutates_args=(), schema=_SCHEMAS["dequantize_4bit"])
def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: Sequence[int],
                    dtype: torch.dtype) -> Tensor:
    """fp32 code[q] * absmax[block], cast to `dtype`, in `shape` (absmax is the real fp32 absmax)."""
    _check_4bit_args(packed, absmax, code, blocksize, math.prod(shape))
    return blockwise.dequantize_4bit_ref(packed, absmax, code, blocksize, list(shape), dtype)


@dequantize_4bit.register_fake
def _(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: Sequence[int],
      dtype: torch.dtype) -> Tensor:
    return packed.new_empty(list(shape), dtype=dtype)


def _real_absmax(absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                 nested_offset: float) -> Tensor:
    if nested_absmax is None:
        return absmax
    torch._check(nested_code is not None, lambda: "nested_absmax given without nested_code")
    return blockwise.dequantize_absmax(absmax, nested_absmax, nested_code, nested_offset)


@torch.library.custom_op(f"{_LIB}::gemm_4bit", mutates_args=(), schema=_SCHEMAS["gemm_4bit"])
def gemm_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
              in_features: int, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
              nested_offset: float, bias: Optional[Tensor]) -> Tensor:
    """x @ W.T + bias in x.dtype, W the dequantized [out_features, in_features] 4-bit weight."""
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, layer takes {in_features}")
    real = _real_absmax(absmax, nested_absmax, nested_code, nested_offset)
    _check_4bit_args(packed, real, code, blocksize, out_features * in_features)
    w = blockwise.dequantize_4bit_ref(packed, real, code, blocksize, [out_features, in_features], x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, w, b)


@gemm_4bit.register_fake
def _(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
      in_features: int, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
      nested_offset: float, bias: Optional[Tensor]) -> Tensor:
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, layer takes {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op(f"{_LIB}::quantize_int8_rowwise", mutates_args=(), schema=_SCHEMAS["quantize_int8_rowwise"])
def quantize_int8_rowwise(A: Tensor) -> tuple[Tensor, Tensor]:
    """int8 round(A * 127 / absmax_row) and the fp32 absmax of each row (last dim)."""
    return int8.quantize_rowwise_ref(A)


@quantize_int8_rowwise.register_fake
def _(A: Tensor) -> tuple[Tensor, Tensor]:
    return A.new_empty(A.shape, dtype=torch.int8), A.new_empty(A.shape[:-1], dtype=torch.float32)


def _check_features(x: Tensor, weight: Tensor) -> None:
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"x has {x.shape[-1]} features, weight takes {weight.shape[1]}")


@torch.library.custom_op(f"{_LIB}::int8_linear", mutates_args=(), schema=_SCHEMAS["int8_linear"])
def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """LLM.int8() x @ W.T + bias in x.dtype (outlier columns above `threshold` in x.dtype, the rest int8)."""
    torch._check(weight.dtype == torch.int8, lambda: f"weight must be int8, got {weight.dtype}")
    _check_features(x, weight)
    return int8.int8_linear_ref(x, weight, scale, bias, threshold)


@int8_linear.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    _check_features(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


for _name, _fn in KERNELS.items():  # CUDA implementations beside the reference defined above
    torch.library.register_kernel(f"{_LIB}::{_name}", "cuda", _fn)


def cuda_kernel(name: str) -> Callable:
    """The CUDA implementation registered for op `shardq::<name>` (`call` uses it to skip the dispatcher)."""
    return KERNELS[name]


def reference(name: str) -> Callable:
    """The pure-PyTorch reference implementation of op `name` (the default kernel in shardq.kernels.ops)."""
    fn = getattr(globals()[name], "_init_fn", None)
    if fn is not None:
        return fn

    def via_cpu(*args):
        dev = next(a.device for a in args if isinstance(a, Tensor))
        cpu = [a.cpu() if isinstance(a, Tensor) else a for a in args]
        out = getattr(torch.ops.shardq, name)(*cpu)
        return tuple(o.to(dev) for o in out) if isinstance(out, tuple) else out.to(dev)

    return via_cpu


def call(name: str, *args):
    """Run `shardq::<name>` eagerly. A plain CUDA tensor as first argument, outside torch.compile and needing no
    gradient, goes straight to the op's CUDA kernel: the torch.library dispatcher costs 8-28 µs of host time per
    call (bench/bench_op_overhead.py), more than a decode-sized kernel takes. Anything else
    (CPU, meta and fake tensors, tracing, autograd) goes through the op, so torch.compile sees the op."""
    x = args[0]
    if _direct(x):
        return cuda_kernel(name)(*args)
    return getattr(torch.ops.shardq, name)(*args)


def _direct(x: Tensor) -> bool:
    return (type(x) is Tensor and x.is_cuda and not torch.compiler.is_compiling()
            and not (x.requires_grad and torch.is_grad_enabled()))


import shardq.kernels.autograd  # noqa: E402,F401  (backward formulas of the ops above)
