"""csrc/gemm_4bit_flat.cu (4-bit for M <= 8 on any K: rows starting mid-byte, blocks straddling rows) called directly
and through the op, against the fp64 reference (skipped without a GPU). Fresh random inputs every run, outlier
columns in x, outputs poisoned with NaN before each launch."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import shardq.kernels.ops  # noqa: F401
from shardq.kernels import cuda_ops, lib
from shardq.formats import blockwise
from test_kernels_gpu import DEV, SEED, _gen, _poison, _quantized_weight, graph_replay
from _f_numerics import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cases():
    shapes = [(4097, 1000), (4097, 1003), (1000, 1003), (33, 77), (7, 5), (11011, 130), (4100, 64), (16385, 9),
              (4096, 1000), (1, 3), (129, 40000)]
    combos = itertools.cycle(itertools.product([torch.float16, torch.bfloat16, torch.float32], ["nf4", "fp4"],
                                               [False, True], [64, 32, 128, 4096]))
    for i, ((k, n), m) in enumerate(itertools.product(shapes, [1, 2, 3, 5, 8])):
        dtype, qt, dq, bs = next(combos)
        yield pytest.param(k, n, m, dtype, qt, dq, bs, id=f"K{k}-N{n}-M{m}-{i}")


def _smem_needed(m: int, k: int, dtype: torch.dtype) -> int:
    """Shared memory the kernel stages x in: K + 64 columns (32 zero columns on each side) in runs of 32, MT (M padded
    to 1, 2, 4 or 8) tokens per column (fp32, or 16-bit for 16-bit x from MT = 4) and a pad of min(16, MT x value
    size) bytes per run, beside 1088 bytes of static arrays."""
    mt = 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8
    size = 2 if mt >= 4 and dtype != torch.float32 else 4
    return -(-(k + 64) // 32) * (32 * mt * size + min(16, mt * size)) + 1088


def _direct(x, packed, absmax, code, nested, bias, bs, n, k) -> tuple[int, torch.Tensor]:
    am, _keep = cuda_ops._absmax_args(absmax, nested[0], nested[1], nested[2], -(-n * k // bs))
    _poison(x.shape[0] * n * x.element_size())
    out = torch.empty((x.shape[0], n), device=DEV, dtype=x.dtype)
    rc = lib.load().shardq_gemm_4bit_flat(x.data_ptr(), packed.data_ptr(), *am, code.data_ptr(),
                                          None if bias is None else bias.data_ptr(), out.data_ptr(), x.shape[0], n, k,
                                          bs, cuda_ops.DTYPE_CODES[x.dtype], cuda_ops._stream(x))
    return rc, out


@pytest.mark.parametrize("k,n,m,dtype,qt,dq,bs", list(_cases()))
def test_flat_against_reference(k, n, m, dtype, qt, dq, bs):
    """Direct launch within a few times the error of the same computation through torch (refused where x does not
    fit in shared memory); where the op routes the shape here (K % 32 != 0, M <= FLAT_MAX_M) its output
    is the direct launch's bit for bit."""
    g = _gen("g4flat", k, n, m, bs, dq)
    packed, absmax, code, nested, real = _quantized_weight(n, k, qt, dq, g, bs)
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    x[:, ::max(1, k // 8)] *= 20.0
    bias = torch.randn(n, device=DEV, generator=g).to(dtype) if m % 2 else None
    rc, out = _direct(x, packed, absmax, code, nested, bias, bs, n, k)
    if _smem_needed(m, k, dtype) > torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, "accepted an x too large for shared memory"
        return
    assert rc == 0, f"flat kernel refused K={k} N={n} M={m} bs={bs}: rc {rc}"
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "output not fully written"
    wdq = blockwise.dequantize_4bit_ref(packed, real, code, bs, [n, k], torch.float32)
    ref = x.double() @ wdq.double().T + (0 if bias is None else bias.double())
    same = F.linear(x, wdq.to(dtype), bias)
    err, tol = rel_err(out, ref), 4 * rel_err(same, ref) + 1e-7
    assert err <= tol, f"seed {SEED}: rel err {err:.3e} > {tol:.3e}"
    if k % 32 and m <= cuda_ops.FLAT_MAX_M:  # the op routes these here
        op = torch.ops.shardq.gemm_4bit(x, packed, absmax, code, bs, n, k, *nested, bias)
        assert torch.equal(op, out), "the op did not use the flat kernel"


def test_flat_refusals_and_graph():
    """Refused before launch: M > 8, weights not 16-byte aligned, x too large for shared memory;
    captured in a CUDA graph through the op it replays like eager."""
    g = _gen("g4flat-ref")
    n, k = 1000, 4097
    packed, absmax, code, nested, _ = _quantized_weight(n, k, "nf4", False, g)
    x = torch.randn(9, k, device=DEV, dtype=torch.float16, generator=g)
    assert _direct(x, packed, absmax, code, nested, None, 64, n, k)[0] == lib.CUDA_ERROR_NOT_SUPPORTED
    shifted = torch.cat([packed.new_zeros(1), packed.reshape(-1)])[1:]
    assert _direct(x[:1], shifted, absmax, code, nested, None, 64, n, k)[0] == lib.CUDA_ERROR_NOT_SUPPORTED
    big_k = 65537
    wbig, abig, cbig, nbig, _ = _quantized_weight(8, big_k, "nf4", False, g)
    xbig = torch.randn(8, big_k, device=DEV, dtype=torch.float16, generator=g)
    assert _direct(xbig, wbig, abig, cbig, nbig, None, 64, 8, big_k)[0] == lib.CUDA_ERROR_NOT_SUPPORTED
    fn = lambda xx: torch.ops.shardq.gemm_4bit(xx, packed, absmax, code, 64, n, k, *nested, None)  # noqa: E731
    for m, dtype in ((1, torch.float32), (2, torch.float16), (5, torch.bfloat16), (8, torch.float32)):
        replayed, fresh = graph_replay(fn, torch.randn(m, k, device=DEV, dtype=dtype, generator=g), g)
        assert torch.equal(replayed, fn(fresh)), f"M={m}: graph replay differs from eager"
