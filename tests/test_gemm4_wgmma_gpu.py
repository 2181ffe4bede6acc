"""csrc/gemm_4bit_wgmma.cu (Hopper: weights dequantized in registers into the warpgroup MMA; the default 4-bit path
for M > 32 on compute capability 9.0) against the fp64 reference (skipped without such a GPU or the library).

Same conventions as test_kernels_gpu.py: fresh seeds, outlier columns in x and outlier weights, NaN-poisoned
outputs, tolerance 4 x the error of the same-precision torch matmul + 1e-5. Each case calls the launcher directly;
where the op routes to it (32 < M <= 128; K split where the grid would fill less than half the SMs) the op's output
must be bit-identical to it with the same split (proves the op used the kernel). The grid covers every tile
configuration (64- and 128-token tiles, 128 and 256 features per CTA), ragged M and N, K not a multiple of 128,
every blocksize the kernel takes, nf4/fp4, double quant, bias, fp16/bf16.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

import shardq.kernels.ops  # noqa: F401
from shardq.kernels import cuda_ops, lib
from _f_gemm4 import _grid, _inputs, _misaligned, _op
from test_kernels_gpu import SEED, _gen, graph_replay
from _f_numerics import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs a compute capability 9.0 GPU (Hopper)")]

DEV = "cuda"
# (K, N): the shapes, N tails (1000, 1032, 28680 = 112 * 256 + 8), K = 4160 (65 k-tiles: odd, not % 128)
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (1024, 1000), (2048, 1032), (4160, 520), (64, 264)]
MS = [1, 7, 33, 48, 64, 65, 100, 129, 256, 512, 1000, 4096]
BIG = [(8192, 28672, 33), (8192, 28672, 256), (8192, 28680, 512), (8192, 28672, 4096)]


@pytest.fixture(scope="module", autouse=True)
def _library():
    if lib.load() is None:
        pytest.skip(f"kernels library unavailable: {lib.error()}")


def _direct(args, k: int, n: int, m: int, bs: int, x: Optional[torch.Tensor] = None,
            packed: Optional[torch.Tensor] = None, splits: Optional[int] = None) -> tuple[int, torch.Tensor]:
    """Call shardq_gemm_4bit_wgmma itself on a NaN-poisoned output, with the op's K split unless `splits` is given
    (x / packed may be replaced): (rc, output)."""
    x0, packed0, absmax, code, nested, bias = args
    x = x0 if x is None else x
    packed = packed0 if packed is None else packed
    if splits is None:
        splits = cuda_ops.wgmma_splits(m, n, k, x0.device) or 1
    am, _keep = cuda_ops._absmax_args(absmax, nested[0], nested[1], nested[2], -(-n * k // bs))
    out = torch.full((m, n), float("nan"), dtype=x0.dtype, device=DEV)
    ws = torch.full((splits * m * n,), float("nan"), device=DEV)
    rc = lib.load().shardq_gemm_4bit_wgmma(x.data_ptr(), packed.data_ptr(), *am, code.data_ptr(),
                                           None if bias is None else bias.data_ptr(), out.data_ptr(),
                                           ws.data_ptr() if splits > 1 else None, m, n, k, bs, splits,
                                           cuda_ops.DTYPE_CODES[x0.dtype], cuda_ops._stream(x0))
    torch.cuda.synchronize()
    return rc, out


@pytest.mark.parametrize("k,n,m,dtype,qt,dq,bs,bias", list(_grid(SHAPES, MS, BIG)))
def test_gemm4_wgmma(k, n, m, dtype, qt, dq, bs, bias):
    args, ref, tol = _inputs(k, n, m, dtype, qt, dq, bs, bias, "wgmma")
    rc, direct = _direct(args, k, n, m, bs)
    assert rc == 0, f"gemm_4bit_wgmma refused K={k} N={n} M={m} bs={bs} (rc {rc})"
    assert torch.isfinite(direct).all(), "output not fully written"
    err = rel_err(direct, ref)
    assert err <= tol, f"seed {SEED}: rel err {err:.3e} > {tol:.3e}"
    if cuda_ops.wgmma_splits(m, n, k, args[0].device):
        out = _op(args, k, n, bs)
        assert out.shape == (m, n) and out.dtype == dtype
        assert torch.equal(out, direct), "the op did not use gemm_4bit_wgmma"


@pytest.mark.parametrize("bs", [64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("dq", [False, True])
def test_gemm4_wgmma_blocksizes(bs, dq):
    """Blocks longer than a row (4096 > K = 2048) too: a 64-column k-tile always lies inside one block."""
    k, n, m = 2048, 1000, 100
    args, ref, tol = _inputs(k, n, m, torch.bfloat16 if dq else torch.float16, "nf4", dq, bs, True, "wgbs")
    rc, out = _direct(args, k, n, m, bs)
    assert rc == 0 and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= tol, f"seed {SEED}: bs {bs}: rel err {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("k,bs,shift,what", [(1056, 64, None, "K % 64"), (2048, 32, None, "blocksize 32"),
                                             (2048, 64, "x", "misaligned x"), (2048, 64, "w", "misaligned w")])
def test_gemm4_wgmma_refuses(k, bs, shift, what):
    """Refused shapes launch nothing (the output keeps its NaN) and the op falls back to dequantize + cuBLAS."""
    n, m = 1000, 64
    args, ref, tol = _inputs(k, n, m, torch.float16, "nf4", False, bs, True, "wgref")
    x, packed = _misaligned(args[0], args[1], shift)
    rc, out = _direct(args, k, n, m, bs, x=x, packed=packed)
    assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{what}: rc {rc}"
    assert torch.isnan(out).all(), f"{what}: the refused call wrote to the output"
    fallback = _op((x, packed, *args[2:]), k, n, bs)
    err = rel_err(fallback, ref)
    assert torch.isfinite(fallback).all() and err <= tol, f"{what}: fallback rel err {err:.3e} > {tol:.3e}"


def _force(monkeypatch) -> None:
    """Route every M > 32 and grid to the kernel (the op's default sends only where it measured faster)."""
    monkeypatch.setattr(cuda_ops, "WGMMA_MAX_M", 1 << 30)
    monkeypatch.setattr(cuda_ops, "WGMMA_MIN_FILL", 0.0)


@pytest.mark.parametrize("k,n,m", [(4096, 4096, 64), (11008, 4096, 100), (1024, 1000, 33), (4160, 520, 128)])
@pytest.mark.parametrize("splits", [2, 3, 5, 8])
def test_gemm4_wgmma_k_split(k, n, m, splits):
    """K in `splits` runs of k-tiles (uneven where they do not divide), partial sums added in order with the bias:
    within tolerance, deterministic (two calls bit-equal)."""
    dtype = torch.bfloat16 if splits % 2 else torch.float16
    args, ref, tol = _inputs(k, n, m, dtype, "nf4" if splits < 5 else "fp4", splits > 2, 64, splits != 3, "wgsplit")
    rc, out = _direct(args, k, n, m, 64, splits=splits)
    assert rc == 0 and torch.isfinite(out).all(), f"rc {rc}"
    err = rel_err(out, ref)
    assert err <= tol, f"seed {SEED}: splits {splits}: rel err {err:.3e} > {tol:.3e}"
    assert torch.equal(out, _direct(args, k, n, m, 64, splits=splits)[1])


def test_gemm4_wgmma_off_uses_dequantize(monkeypatch):
    """SHARDQ_GEMM4_WGMMA=0 (the comparison switch) sends M > 32 to dequantize + cuBLAS: a different rounding path,
    still within tolerance."""
    _force(monkeypatch)
    k, n, m = 2048, 1032, 256
    args, ref, tol = _inputs(k, n, m, torch.float16, "nf4", True, 64, True, "wgoff")
    on = _op(args, k, n, 64)
    monkeypatch.setattr(cuda_ops, "GEMM4_WGMMA", False)
    off = _op(args, k, n, 64)
    rc, direct = _direct(args, k, n, m, 64, splits=1)
    assert rc == 0 and torch.equal(on, direct) and not torch.equal(off, direct)
    assert rel_err(off, ref) <= tol and rel_err(on, ref) <= tol


@pytest.mark.parametrize("m", [33, 256])
def test_gemm4_wgmma_cuda_graph(monkeypatch, m):
    """The op captures into a CUDA graph; replay on new x equals eager, and eager is the kernel's own output."""
    _force(monkeypatch)
    k, n = 2048, 1032
    args, _, _ = _inputs(k, n, m, torch.float16, "nf4", True, 64, True, "wggraph")
    x = args[0]
    fn = lambda t: torch.ops.shardq.gemm_4bit(t, *args[1:4], 64, n, k, *args[4], args[5])  # noqa: E731
    out, fresh = graph_replay(fn, x, _gen("wggraph-fresh", m))
    eager = fn(fresh)
    assert torch.equal(out, eager), f"M={m}: graph replay differs from eager"
    rc, direct = _direct((fresh, *args[1:]), k, n, m, 64, splits=1)
    assert rc == 0 and torch.equal(direct, eager)
