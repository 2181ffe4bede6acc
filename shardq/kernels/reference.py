"""The pure-PyTorch reference of every `shardq::*` op: the ops' default kernel (CPU path), the CUDA wrappers'
fallback when the kernels library is unavailable, and the oracle of the kernel tests. Argument checks are shared
with the ops' fake kernels, so a bad call fails with the same message on every device."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from shardq.formats import blockwise, int8


def check_4bit_args(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, numel: int) -> None:
    """Shape/dtype checks shared by the reference and fake kernels (clear errors instead of garbage)."""
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(
        packed.numel() == (numel + 1) // 2,
        lambda: f"packed holds {packed.numel()} bytes, expected ceil({numel}/2) = {(numel + 1) // 2}",
    )
    torch._check(
        absmax.numel() == blockwise.n_blocks(numel, blocksize),
        lambda: f"absmax has {absmax.numel()} entries, expected ceil({numel}/{blocksize})",
    )
    torch._check(
        code.numel() == 16 and code.dtype == torch.float32,
        lambda: f"code must be fp32 [16], got {code.dtype} {tuple(code.shape)}",
    )


def check_features(x: Tensor, weight: Tensor) -> None:
    torch._check(
        x.shape[-1] == weight.shape[1], lambda: f"x has {x.shape[-1]} features, weight takes {weight.shape[1]}"
    )


def _real_absmax(
    absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None, nested_offset: float
) -> Tensor:
    if nested_absmax is None:
        return absmax
    torch._check(nested_code is not None, lambda: "nested_absmax given without nested_code")
    return blockwise.dequantize_absmax(absmax, nested_absmax, nested_code, nested_offset)


def quantize_4bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Blockwise absmax quantization of A to a 16-entry code: (packed uint8 [ceil(n/2),1], absmax fp32)."""
    return blockwise.quantize_4bit_ref(A, code, blocksize)


def dequantize_4bit(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype
) -> Tensor:
    """fp32 code[q] * absmax[block], cast to `dtype`, in `shape` (absmax is the real fp32 absmax)."""
    check_4bit_args(packed, absmax, code, blocksize, math.prod(shape))
    return blockwise.dequantize_4bit_ref(packed, absmax, code, blocksize, list(shape), dtype)


def gemm_4bit(
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
    """x @ W.T + bias in x.dtype, W the dequantized [out_features, in_features] 4-bit weight."""
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, layer takes {in_features}")
    real = _real_absmax(absmax, nested_absmax, nested_code, nested_offset)
    check_4bit_args(packed, real, code, blocksize, out_features * in_features)
    w = blockwise.dequantize_4bit_ref(packed, real, code, blocksize, [out_features, in_features], x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, w, b)


def check_grouped_args(
    x: Tensor, offsets: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int
) -> None:
    """Shape/dtype checks of `grouped_gemm_4bit` shared by the reference and fake kernels (no data read)."""
    torch._check(x.dim() == 2, lambda: f"x must be [tokens, in_features], got {tuple(x.shape)}")
    torch._check(packed.dim() >= 2 and packed.dtype == torch.uint8, lambda: "packed must be uint8 [E, bytes]")
    experts, numel = packed.shape[0], out_features * x.shape[1]
    torch._check(
        offsets.dim() == 1 and offsets.shape[0] == experts + 1 and offsets.dtype in (torch.int32, torch.int64),
        lambda: f"offsets must be int32/int64 [E + 1] = [{experts + 1}], got {offsets.dtype} {tuple(offsets.shape)}",
    )
    torch._check(
        packed[0].numel() == (numel + 1) // 2,
        lambda: f"packed holds {packed[0].numel()} bytes per expert, expected ceil({numel}/2)",
    )
    torch._check(
        absmax.shape[0] == experts and absmax[0].numel() == blockwise.n_blocks(numel, blocksize),
        lambda: f"absmax must be [E, ceil({numel}/{blocksize})], got {tuple(absmax.shape)}",
    )
    torch._check(
        code.shape == (experts, 16) and code.dtype == torch.float32,
        lambda: f"code must be fp32 [E, 16], got {code.dtype} {tuple(code.shape)}",
    )


def grouped_gemm_4bit(
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
    """Rows offsets[e]:offsets[e + 1] of x times expert e's dequantized [out_features, in_features] weight, in
    x.dtype: each hit expert dequantized whole (as `QuantizedExperts[e]` does), experts without rows never read."""
    check_grouped_args(x, offsets, packed, absmax, code, blocksize, out_features)
    bounds = [int(v) for v in offsets.tolist()]
    torch._check(
        bounds[0] == 0 and bounds[-1] == x.shape[0] and all(a <= b for a, b in zip(bounds, bounds[1:])),
        lambda: f"offsets must rise from 0 to the {x.shape[0]} rows of x, got {bounds}",
    )
    out = x.new_zeros((x.shape[0], out_features))
    for e, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        if start == stop:
            continue
        real = absmax[e]
        if nested_absmax is not None:
            if nested_code is None or nested_offset is None:
                raise ValueError("double quant needs nested_absmax, nested_code and nested_offset")
            real = blockwise.dequantize_absmax(absmax[e], nested_absmax[e], nested_code[e], float(nested_offset[e]))
        w = blockwise.dequantize_4bit_ref(packed[e], real, code[e], blocksize, [out_features, x.shape[1]], x.dtype)
        out[start:stop] = torch.nn.functional.linear(x[start:stop], w)
    return out


def quantize_int8_rowwise(A: Tensor) -> tuple[Tensor, Tensor]:
    """int8 round(A * 127 / absmax_row) and the fp32 absmax of each row (last dim)."""
    return int8.quantize_rowwise_ref(A)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """LLM.int8() x @ W.T + bias in x.dtype (outlier columns above `threshold` in x.dtype, the rest int8)."""
    torch._check(weight.dtype == torch.int8, lambda: f"weight must be int8, got {weight.dtype}")
    check_features(x, weight)
    return int8.int8_linear_ref(x, weight, scale, bias, threshold)
