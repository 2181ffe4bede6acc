"""Shared pieces of the 4-bit GEMM kernel tests: inputs with outliers and their fp64 reference, misaligned copies,
the op call on a poisoned allocator, and the case grid (dtype, format, double quant, blocksize and bias cycled)."""

from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from _f_numerics import rel_err
from shardq.formats import blockwise
from test_kernels_gpu import _gen, _poison, _quantized_weight

DEV = "cuda"
BLOCKSIZES = [64, 128, 256]


def _inputs(k: int, n: int, m: int, dtype: torch.dtype, qt: str, dq: bool, bs: int, with_bias: bool, key: str):
    """Quantized weight, x with outlier columns, optional bias, and the fp64 reference output."""
    g = _gen(key, k, n, m, bs)
    packed, absmax, code, nested, real = _quantized_weight(n, k, qt, dq, g, bs)
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    x[:, ::max(1, k // 8)] *= 20.0
    bias = torch.randn(n, device=DEV, generator=g).to(dtype) if with_bias else None
    wdq = blockwise.dequantize_4bit_ref(packed, real, code, bs, [n, k], torch.float32)
    ref = x.double() @ wdq.double().T + (0 if bias is None else bias.double())
    tol = 4 * rel_err(F.linear(x, wdq.to(dtype), bias), ref) + 1e-5
    return (x, packed, absmax, code, nested, bias), ref, tol


def _misaligned(x: torch.Tensor, packed: torch.Tensor, shift: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of x ("x") or the packed weights ("w") one element past a 16-byte boundary (None: both as given)."""
    if shift == "x":
        xs = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEV)
        xs[1:].copy_(x.reshape(-1))
        x = xs[1:].view(x.shape)
    if shift == "w":
        ps = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=DEV)
        ps[1:].copy_(packed.reshape(-1))
        packed = ps[1:]
    return x, packed


def _op(args, k: int, n: int, bs: int) -> torch.Tensor:
    x, packed, absmax, code, nested, bias = args
    _poison(x.shape[0] * n * x.element_size())
    return torch.ops.shardq.gemm_4bit(x, packed, absmax, code, bs, n, k, *nested, bias)


def _grid(shapes, ms, big):
    """Every (K, N) with every M, then the big cases, cycling dtype, format, double quant, blocksize and bias."""
    cases = list(itertools.product(shapes, ms)) + [((k, n), m) for k, n, m in big]
    for i, ((k, n), m) in enumerate(cases):
        dtype = [torch.float16, torch.bfloat16][i % 2]
        qt, dq, bs, bias = ["nf4", "fp4"][(i // 2) % 2], (i // 4) % 2 == 1, BLOCKSIZES[i % 3], (i // 3) % 2 == 0
        yield pytest.param(k, n, m, dtype, qt, dq, bs, bias,
                           id=f"K{k}-N{n}-M{m}-{str(dtype)[6:]}-{qt}-dq{int(dq)}-bs{bs}-b{int(bias)}")
