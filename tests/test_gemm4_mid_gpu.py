"""csrc/gemm_4bit_mid.cu (fused-dequant tensor-core 4-bit GEMM, opt-in via SHARDQ_GEMM4_MID; any M) against the
fp64 reference (skipped without a GPU or without the kernels library).

Same conventions as test_kernels_gpu.py (whose helpers it uses): fresh seeds, outlier columns in x and outlier
weights, NaN-poisoned outputs, tolerance 4 x the error of the same-precision torch matmul + 1e-5. Every case calls
the launcher directly and through the op with cuda_ops.GEMM4_MID on; the two must be bit-identical (proves the
op used the kernel). The shapes x M grid is sampled so dtype, code, double quant, blocksize and bias rotate.
"""

from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import shardq.kernels.ops  # noqa: F401
from shardq.kernels import cuda_ops, lib
from shardq.formats import blockwise
from test_kernels_gpu import SEED, _gen, _poison, _quantized_weight, graph_replay
from _f_numerics import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (1024, 1000), (2048, 1032)]  # (K, N); 1000, 1032: N tails
MS = [1, 7, 16, 32, 33, 48, 64, 100, 256, 512, 1024]  # M <= 32 too: the bench times it there
BIG = [(8192, 28672, 33), (8192, 28672, 256)]
BLOCKSIZES = [64, 128, 256]


@pytest.fixture(scope="module", autouse=True)
def _library():
    if lib.load() is None:
        pytest.skip(f"kernels library unavailable: {lib.error()}")


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


def _direct(args, k: int, n: int, m: int, bs: int, x: Optional[torch.Tensor] = None,
            packed: Optional[torch.Tensor] = None, launcher: str = "shardq_gemm_4bit_mid") -> tuple[int, torch.Tensor]:
    """Call the launcher itself on a NaN-poisoned output (x / packed may be replaced): (rc, output)."""
    x0, packed0, absmax, code, nested, bias = args
    x = x0 if x is None else x
    packed = packed0 if packed is None else packed
    am, _keep = cuda_ops._absmax_args(absmax, nested[0], nested[1], nested[2], -(-n * k // bs))
    out = torch.full((m, n), float("nan"), dtype=x0.dtype, device=DEV)
    rc = getattr(lib.load(), launcher)(x.data_ptr(), packed.data_ptr(), *am, code.data_ptr(),
                                       None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k, bs,
                                       cuda_ops.DTYPE_CODES[x0.dtype], cuda_ops._stream(x0))
    torch.cuda.synchronize()
    return rc, out


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


def _grid(shapes=SHAPES, ms=MS, big=BIG):
    """Every (K, N) with every M, then the big cases, cycling dtype, format, double quant, blocksize and bias."""
    cases = list(itertools.product(shapes, ms)) + [((k, n), m) for k, n, m in big]
    for i, ((k, n), m) in enumerate(cases):
        dtype = [torch.float16, torch.bfloat16][i % 2]
        qt, dq, bs, bias = ["nf4", "fp4"][(i // 2) % 2], (i // 4) % 2 == 1, BLOCKSIZES[i % 3], (i // 3) % 2 == 0
        yield pytest.param(k, n, m, dtype, qt, dq, bs, bias,
                           id=f"K{k}-N{n}-M{m}-{str(dtype)[6:]}-{qt}-dq{int(dq)}-bs{bs}-b{int(bias)}")


@pytest.mark.parametrize("k,n,m,dtype,qt,dq,bs,bias", list(_grid()))
def test_gemm4_mid(monkeypatch, k, n, m, dtype, qt, dq, bs, bias):
    args, ref, tol = _inputs(k, n, m, dtype, qt, dq, bs, bias, "mid")
    rc, direct = _direct(args, k, n, m, bs)
    assert rc == 0, f"gemm_4bit_mid refused K={k} N={n} M={m} bs={bs} (rc {rc})"
    assert torch.isfinite(direct).all(), "output not fully written"
    err = rel_err(direct, ref)
    assert err <= tol, f"seed {SEED}: rel err {err:.3e} > {tol:.3e}"
    monkeypatch.setattr(cuda_ops, "GEMM4_MID", True)
    monkeypatch.setattr(cuda_ops, "GEMM4_MID_MIN_M", 1)
    out = _op(args, k, n, bs)
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.equal(out, direct), "the op did not use gemm_4bit_mid"


@pytest.mark.parametrize("bs", [64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("dq", [False, True])
def test_gemm4_mid_blocksizes(bs, dq):
    """Blocks longer than a row (4096 > K = 2048) too: a 64-column k-tile always lies inside one block."""
    k, n, m = 2048, 1000, 100
    args, ref, tol = _inputs(k, n, m, torch.bfloat16 if dq else torch.float16, "nf4", dq, bs, True, "midbs")
    rc, out = _direct(args, k, n, m, bs)
    assert rc == 0 and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= tol, f"seed {SEED}: bs {bs}: rel err {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("k,bs,shift,what", [(1056, 64, None, "K % 64"), (2048, 32, None, "blocksize 32"),
                                             (2048, 64, "x", "misaligned x"), (2048, 64, "w", "misaligned w")])
def test_gemm4_mid_refuses(monkeypatch, k, bs, shift, what):
    """Refused shapes launch nothing (the output keeps its NaN) and the op falls back to dequantize + cuBLAS."""
    n, m = 1000, 64
    args, ref, tol = _inputs(k, n, m, torch.float16, "nf4", False, bs, True, "midref")
    x, packed = _misaligned(args[0], args[1], shift)
    rc, out = _direct(args, k, n, m, bs, x=x, packed=packed)
    assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{what}: rc {rc}"
    assert torch.isnan(out).all(), f"{what}: the refused call wrote to the output"
    monkeypatch.setattr(cuda_ops, "GEMM4_MID", True)
    fallback = _op((x, packed, *args[2:]), k, n, bs)
    err = rel_err(fallback, ref)
    assert torch.isfinite(fallback).all() and err <= tol, f"{what}: fallback rel err {err:.3e} > {tol:.3e}"


def test_gemm4_mid_fp32_input_falls_back(monkeypatch):
    monkeypatch.setattr(cuda_ops, "GEMM4_MID", True)
    k, n, m = 1024, 1000, 64
    g = _gen("midf32")
    packed, absmax, code, nested, real = _quantized_weight(n, k, "nf4", False, g)
    x = torch.randn(m, k, device=DEV, generator=g)
    out = torch.ops.shardq.gemm_4bit(x, packed, absmax, code, 64, n, k, *nested, None)
    wdq = blockwise.dequantize_4bit_ref(packed, real, code, 64, [n, k], torch.float64)
    assert out.dtype == torch.float32 and rel_err(out, x.double() @ wdq.T) < 1e-5


@pytest.mark.parametrize("m", [33, 256])
def test_gemm4_mid_cuda_graph(monkeypatch, m):
    """The op with the mid path on captures into a CUDA graph; replay on new x equals eager, and eager is the
    kernel's own output."""
    monkeypatch.setattr(cuda_ops, "GEMM4_MID", True)
    k, n = 2048, 1032
    args, _, _ = _inputs(k, n, m, torch.float16, "nf4", True, 64, True, "midgraph")
    x = args[0]
    fn = lambda t: torch.ops.shardq.gemm_4bit(t, *args[1:4], 64, n, k, *args[4], args[5])  # noqa: E731
    out, fresh = graph_replay(fn, x, _gen("midgraph-fresh", m))
    eager = fn(fresh)
    assert torch.equal(out, eager), f"M={m}: graph replay differs from eager"
    rc, direct = _direct((fresh, *args[1:]), k, n, m, 64)
    assert rc == 0 and torch.equal(direct, eager)
