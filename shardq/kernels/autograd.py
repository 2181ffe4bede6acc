"""Backward formulas of the quantized matmuls (`shardq::gemm_4bit`, `shardq::int8_linear`), for adapter training.

The quantized weights are frozen (buffers, as in bitsandbytes), so only the input and the bias get gradients:
grad_x = grad_out @ W and grad_bias = grad_out summed over the tokens. W is the dequantized weight, built in row
chunks of at most `DEQUANT_CHUNK_BYTES` through the existing ops (4-bit: `shardq::dequantize_4bit`, which has a
CUDA kernel; int8: q * SCB / 127 as LLM.int8()'s backward does), so the backward's scratch is the same chunk the
forward's large-M path already reserves, plus an fp32 accumulator when the weight takes several chunks.
LLM.int8()'s outlier split and row quantization of x are treated as the identity (a straight-through estimate),
exactly as bitsandbytes does.

`shardq.kernels.ops` imports this module last, which registers the formulas (importing it before `ops` fails:
the ops do not exist yet, and importing `ops` from here would be a cycle).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from shardq.formats import blockwise, int8
from shardq.kernels.cuda_ops import DEQUANT_CHUNK_BYTES

_LIB = "shardq"


def chunk_rows(out_features: int, in_features: int, itemsize: int, blocksize: int = 1) -> int:
    """Rows of W dequantized per step: at most DEQUANT_CHUNK_BYTES, and (4-bit) a whole number of quantization
    blocks and bytes, so each chunk's packed codes and absmax are plain slices."""
    align = blocksize // math.gcd(in_features, blocksize) if blocksize > 1 else 1
    if blocksize > 1 and (align * in_features) % 2:
        align *= 2
    rows = max(1, DEQUANT_CHUNK_BYTES // max(1, in_features * itemsize))
    rows = max(align, rows // align * align)
    return min(out_features, rows)


def _grad_input(
    grad: Tensor, out_features: int, in_features: int, rows: int, weight_rows: Callable[[int, int], Tensor]
) -> Tensor:
    """grad [.., out] @ W [out, in] with W built `rows` rows at a time by `weight_rows(start, stop)`."""
    g2 = grad.reshape(-1, out_features)
    if rows >= out_features:
        return (g2 @ weight_rows(0, out_features)).reshape(*grad.shape[:-1], in_features)
    dtype = torch.promote_types(grad.dtype, torch.float32)  # 16-bit chunk products summed in fp32
    acc = torch.zeros(g2.shape[0], in_features, dtype=dtype, device=grad.device)
    for start in range(0, out_features, rows):
        stop = min(out_features, start + rows)
        acc.addmm_(g2[:, start:stop].to(dtype), weight_rows(start, stop).to(dtype))
    return acc.to(grad.dtype).reshape(*grad.shape[:-1], in_features)


def _grad_bias(grad: Tensor, bias: Tensor | None, needed: bool) -> Tensor | None:
    if not needed or bias is None:
        return None
    acc = torch.promote_types(grad.dtype, torch.float32)  # 16-bit grads summed in fp32
    return grad.reshape(-1, grad.shape[-1]).sum(0, dtype=acc).to(bias.dtype)


def _4bit_rows(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, in_features: int, dtype: torch.dtype
) -> Callable[[int, int], Tensor]:
    """Rows [start, stop) of the dequantized 4-bit weight through `shardq::dequantize_4bit` on slices."""
    flat = packed.reshape(-1)

    def rows(start: int, stop: int) -> Tensor:
        e0, e1 = start * in_features, stop * in_features
        part = flat[e0 // 2 : (e1 + 1) // 2].reshape(-1, 1)
        scales = absmax[e0 // blocksize : blockwise.n_blocks(e1, blocksize)]
        return torch.ops.shardq.dequantize_4bit(part, scales, code, blocksize, [stop - start, in_features], dtype)

    return rows


def _setup_gemm_4bit(ctx, inputs, output) -> None:
    _x, packed, absmax, code, blocksize, out_f, in_f, nested_absmax, nested_code, nested_offset, bias = inputs
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, bias)
    ctx.meta = (blocksize, out_f, in_f, nested_offset)
    ctx.x_needs_grad = ctx.needs_input_grad[0]
    ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[10]


def _backward_gemm_4bit(ctx, grad: Tensor):
    packed, absmax, code, nested_absmax, nested_code, bias = ctx.saved_tensors
    blocksize, out_f, in_f, nested_offset = ctx.meta
    grad_x = None
    if ctx.x_needs_grad:
        real = (
            absmax
            if nested_absmax is None
            else blockwise.dequantize_absmax(absmax, nested_absmax, nested_code, nested_offset)
        )
        rows = chunk_rows(out_f, in_f, grad.element_size(), blocksize)
        grad_x = _grad_input(grad, out_f, in_f, rows, _4bit_rows(packed, real, code, blocksize, in_f, grad.dtype))
    return (grad_x, None, None, None, None, None, None, None, None, None, _grad_bias(grad, bias, ctx.bias_needs_grad))


def _setup_int8_linear(ctx, inputs, output) -> None:
    _x, weight, scale, bias, _threshold = inputs
    ctx.save_for_backward(weight, scale, bias)
    ctx.x_needs_grad = ctx.needs_input_grad[0]
    ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[3]


def _backward_int8_linear(ctx, grad: Tensor):
    weight, scale, bias = ctx.saved_tensors
    grad_x = None
    if ctx.x_needs_grad:
        out_f, in_f = weight.shape
        rows = chunk_rows(out_f, in_f, grad.element_size())

        def weight_rows(start: int, stop: int) -> Tensor:
            return int8.dequantize_rowwise_ref(weight[start:stop], scale[start:stop], grad.dtype)

        grad_x = _grad_input(grad, out_f, in_f, rows, weight_rows)
    return grad_x, None, None, _grad_bias(grad, bias, ctx.bias_needs_grad), None


torch.library.register_autograd(f"{_LIB}::gemm_4bit", _backward_gemm_4bit, setup_context=_setup_gemm_4bit)
torch.library.register_autograd(f"{_LIB}::int8_linear", _backward_int8_linear, setup_context=_setup_int8_linear)


FORMULAS = {
    "gemm_4bit": (_setup_gemm_4bit, _backward_gemm_4bit),
    "int8_linear": (_setup_int8_linear, _backward_int8_linear),
}


def eager_function(name: str, impl_for: Callable[[Tensor], Callable]) -> type[torch.autograd.Function]:
    """Op `name`'s formulas as a plain `torch.autograd.Function` whose forward calls `impl_for(x)` (the op's CUDA
    kernel or reference) directly. Eager training calls each quantized matmul three times a step (forward,
    recomputation, backward); through the dispatcher, torch.library's Python autograd layer costs 0.1-0.3 ms of
    host time per call, which at 1B scale is a third of a QLoRA step. torch.compile and fake tensors keep going
    through the op (`ops.call`)."""
    setup, backward = FORMULAS[name]

    def forward(ctx: Any, *args: Any) -> Tensor:
        out = impl_for(args[0])(*args)
        setup(ctx, args, out)  # in forward, not a setup_context: Function.apply binds a signature per call for that
        return out

    body = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(f"{name}_function", (torch.autograd.Function,), body)
