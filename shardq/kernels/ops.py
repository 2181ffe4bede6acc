"""The `shardq::*` custom ops (torch.library). The default kernel of each op is the pure-PyTorch reference in
`shardq.formats` (CPU path and test oracle); the CUDA kernels of `cuda_ops` are registered beside it. Fake
implementations give output shapes so torch.compile and CUDA graphs can capture the ops. Importing this
module only registers Python functions: no extension is loaded and no GPU is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from shardq.formats import blockwise
from shardq.kernels import reference as reference_impl
from shardq.kernels.cuda_ops import KERNELS

_LIB = "shardq"
# The schemas of DESIGN.md, spelled out so they read `int` where inference would write `SymInt`.
_SCHEMAS = {
    "quantize_4bit": "(Tensor A, Tensor code, int blocksize) -> (Tensor packed, Tensor absmax)",
    "dequantize_4bit": (
        "(Tensor packed, Tensor absmax, Tensor code, int blocksize, int[] shape, ScalarType dtype) -> Tensor"
    ),
    "gemm_4bit": (
        "(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, int in_features, "
        "Tensor? nested_absmax, Tensor? nested_code, float nested_offset, Tensor? bias) -> Tensor"
    ),
    "grouped_gemm_4bit": (
        "(Tensor x, Tensor offsets, Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, "
        "Tensor? nested_absmax, Tensor? nested_code, Tensor? nested_offset) -> Tensor"
    ),
    "quantize_int8_rowwise": "(Tensor A) -> (Tensor q, Tensor scale)",
    "int8_linear": "(Tensor x, Tensor weight, Tensor scale, Tensor? bias, float threshold) -> Tensor",
}


def _op(name: str):
    """The custom op `shardq::<name>` with the reference as its default kernel (its `_init_fn`)."""
    return torch.library.custom_op(
        f"{_LIB}::{name}", getattr(reference_impl, name), mutates_args=(), schema=_SCHEMAS[name]
    )


quantize_4bit = _op("quantize_4bit")


@quantize_4bit.register_fake
def _(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    n = A.numel()
    return (
        A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        A.new_empty((blockwise.n_blocks(n, blocksize),), dtype=torch.float32),
    )


dequantize_4bit = _op("dequantize_4bit")


@dequantize_4bit.register_fake
def _(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    return packed.new_empty(list(shape), dtype=dtype)


gemm_4bit = _op("gemm_4bit")


@gemm_4bit.register_fake
def _(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    nested_offset: float,
    bias: Tensor | None,
) -> Tensor:
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, layer takes {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


grouped_gemm_4bit = _op("grouped_gemm_4bit")


@grouped_gemm_4bit.register_fake
def _(
    x: Tensor,
    offsets: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    nested_offset: Tensor | None,
) -> Tensor:
    reference_impl.check_grouped_args(x, offsets, packed, absmax, code, blocksize, out_features)
    return x.new_empty((x.shape[0], out_features))


quantize_int8_rowwise = _op("quantize_int8_rowwise")


@quantize_int8_rowwise.register_fake
def _(A: Tensor) -> tuple[Tensor, Tensor]:
    return A.new_empty(A.shape, dtype=torch.int8), A.new_empty(A.shape[:-1], dtype=torch.float32)


int8_linear = _op("int8_linear")


@int8_linear.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    reference_impl.check_features(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


for _name, _fn in KERNELS.items():  # CUDA implementations beside the reference defined above
    torch.library.register_kernel(f"{_LIB}::{_name}", "cuda", _fn)


def cuda_kernel(name: str) -> Callable:
    """The CUDA implementation registered for op `shardq::<name>` (`call` uses it to skip the dispatcher)."""
    return KERNELS[name]


def reference(name: str) -> Callable:
    """The pure-PyTorch reference implementation of op `name` (the op's default kernel)."""
    return getattr(reference_impl, name)


def call(name: str, *args):
    """Run `shardq::<name>` eagerly. A plain CUDA tensor as first argument, outside torch.compile and needing no
    gradient, goes straight to the op's CUDA kernel: the torch.library dispatcher costs 8-28 µs of host time per
    call (bench/bench_op_overhead.py), more than a decode-sized kernel takes. A real tensor that needs a gradient
    runs the op's backward formulas as a plain autograd.Function (`EAGER`). Anything else (CPU without
    gradients, meta and fake tensors, tracing) goes through the op, so torch.compile sees the op."""
    x = args[0]
    if _direct(x):
        return cuda_kernel(name)(*args)
    if name in EAGER and _eager_grad(x):
        return EAGER[name].apply(*args)
    return getattr(torch.ops.shardq, name)(*args)


def _eager_grad(x: Tensor) -> bool:
    """Eager autograd on a real tensor: the op's formulas run as a plain autograd.Function (`EAGER`)."""
    return (
        type(x) is Tensor
        and x.device.type in ("cuda", "cpu")
        and x.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def _direct(x: Tensor) -> bool:
    return (
        type(x) is Tensor
        and x.is_cuda
        and not torch.compiler.is_compiling()
        and not (x.requires_grad and torch.is_grad_enabled())
    )


import shardq.kernels.autograd  # noqa: E402  (backward formulas of the ops above)


def _impl_for(name: str) -> Callable[[Tensor], Callable]:
    return lambda x: cuda_kernel(name) if x.is_cuda else reference(name)


# the ops' autograd as plain Functions, for eager calls whose input needs a gradient (`call`)
EAGER = {
    name: shardq.kernels.autograd.eager_function(name, _impl_for(name)) for name in shardq.kernels.autograd.FORMULAS
}
