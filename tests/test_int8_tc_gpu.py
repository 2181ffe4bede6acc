"""The int8 tensor-core kernel (csrc/int8_gemm_tc.cu) against the reference and the dp4a GEMV (skipped without a GPU).

Fresh random inputs every run (seeded from the clock, printed on failure), outlier columns in x with |x| far above
the threshold, outputs poisoned with NaN before each launch and checked to be fully written. Both kernels sum the
same int8 products exactly in int32 and end in the same epilogue function (int8_common.cuh), so on the same
prepared activations the tensor-core output must equal the GEMV's bit for bit; against the fp64-exact reference
the tolerance is test_kernels_gpu.test_int8_linear's (2 eps of the output dtype, relative).
"""

from __future__ import annotations

import itertools
import os
from typing import Optional

import pytest
import torch

import shardq.kernels.ops  # noqa: F401
from shardq.kernels import cuda_ops, lib, ops
from shardq.formats import int8
from test_kernels_gpu import SEED, _gen, graph_replay
from _f_numerics import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (1024, 1000), (2048, 1032)]
BIG = (8192, 28672)
MS = [2, 3, 4, 5, 7, 8, 16, 17, 32, 33, 48, 64]
DEV = "cuda"


def _nan_out(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=DEV)


@pytest.fixture(scope="module", autouse=True)
def _library():
    assert lib.load() is not None, f"kernels library unavailable: {lib.error()}"


def _grid():
    combos = list(itertools.product([torch.float16, torch.bfloat16], [6.0, 0.0], [True, False]))
    cases = list(itertools.product(SHAPES, MS)) + [(BIG, m) for m in (7, 33, 64)]
    for i, ((k, n), m) in enumerate(cases):
        dtype, thr, with_bias = combos[i % len(combos)]
        yield pytest.param(k, n, m, dtype, thr, with_bias, id=f"K{k}-N{n}-M{m}-{i % len(combos)}")


def _inputs(k: int, n: int, m: int, dtype: torch.dtype, with_bias: bool, key: str):
    g = _gen(key, k, n, m, dtype, with_bias)
    w8, scb = ops.reference("quantize_int8_rowwise")(torch.randn(n, k, device=DEV, generator=g))
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    x[:, ::max(1, k // 8)] *= 20.0  # outlier columns: |x| up to ~80, far above the threshold 6
    bias = torch.randn(n, device=DEV, generator=g).to(dtype) if with_bias else None
    return x, w8, scb, bias


def _prepare(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, dict[str, int]]:
    """The op's activation side: q, row absmax, outlier list and count in one scratch buffer (kept alive by the
    returned tensor)."""
    m, k = x.shape
    buf, off = cuda_ops._int8_scratch(m, k, x.device)
    p = {name: buf.data_ptr() + o for name, o in off.items()}
    rc = lib.load().shardq_int8_prepare(x.data_ptr(), p["q"], p["row_absmax"], p["colmax"], p["list"], p["count"],
                                        None, 0, m, k, threshold, cuda_ops.DTYPE_CODES[x.dtype], cuda_ops._stream(x))
    assert rc == 0
    return buf, p


def _launch(fn: str, x: torch.Tensor, w8: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
            p: dict[str, int], out: torch.Tensor, q_ptr: Optional[int] = None, w_ptr: Optional[int] = None,
            m: Optional[int] = None, k: Optional[int] = None, dtype_code: Optional[int] = None) -> int:
    n = w8.shape[0]
    return getattr(lib.load(), fn)(
        p["q"] if q_ptr is None else q_ptr, p["row_absmax"], x.data_ptr(), w8.data_ptr() if w_ptr is None else w_ptr,
        scb.data_ptr(), p["list"], p["count"], None if bias is None else bias.data_ptr(), out.data_ptr(),
        x.shape[0] if m is None else m, n, x.shape[1] if k is None else k,
        cuda_ops.DTYPE_CODES[x.dtype] if dtype_code is None else dtype_code, cuda_ops._stream(x))


def _check_reference(out, x, w8, scb, bias, threshold):
    ref = ops.reference("int8_linear")(x, w8, scb, bias, threshold).float()
    eps = torch.finfo(x.dtype).eps
    err = rel_err(out, ref)
    assert err <= 2 * eps, f"seed {SEED}: rel err {err:.3e} vs reference (eps {eps:.1e})"


@pytest.mark.parametrize("k,m", [(32, 1), (1000, 3), (4097, 8), (8192, 16), (28672, 32), (70000, 5), (129, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_prepare_small_m(k, m, dtype, threshold):
    """The small-batch prepare launches (M <= 32: column chunks scanned, then quantized) give exactly the
    reference's activation side: the sorted outlier columns and their count, each row's absmax over the other
    columns, and q with the reference's rounding. K from one word of outlier bits to 61 chunks of 9 columns per
    thread."""
    g = _gen("prep", k, m, dtype, threshold)
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    every = max(1, k // 40)
    x[:, ::every] *= 20.0  # ~40 outlier columns, spread over the chunks
    x[m // 2, k - 1] = -50.0  # an outlier only one row sees, in the last (partial) bit word
    buf, p = _prepare(x, threshold)
    torch.cuda.synchronize()
    cols = int8.outlier_columns(x, threshold)
    xf = x.float().clone()
    xf[:, cols] = 0.0
    q_ref, absmax_ref = int8.quantize_rowwise_ref(xf)
    base = buf.data_ptr()

    def view(name: str, count: int, dt: torch.dtype) -> torch.Tensor:
        o = p[name] - base
        return buf[o:o + count * torch.empty((), dtype=dt).element_size()].view(dt)

    count = int(view("count", 1, torch.int32).item())
    assert count == cols.numel(), f"seed {SEED}: count {count}, reference {cols.numel()}"
    assert torch.equal(view("list", count, torch.int32).long(), cols.to(DEV))
    assert torch.equal(view("row_absmax", m, torch.float32), absmax_ref.to(DEV))
    assert torch.equal(view("q", m * k, torch.int8).view(m, k), q_ref.to(DEV))


@pytest.mark.parametrize("k,n,m,dtype,threshold,with_bias", list(_grid()))
def test_launcher(k, n, m, dtype, threshold, with_bias):
    x, w8, scb, bias = _inputs(k, n, m, dtype, with_bias, "launcher")
    _buf, p = _prepare(x, threshold)
    out, gemv = _nan_out(m, n, dtype), _nan_out(m, n, dtype)
    assert _launch("shardq_int8_gemm_tc", x, w8, scb, bias, p, out) == 0
    assert _launch("shardq_int8_gemv", x, w8, scb, bias, p, gemv) == 0
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "output not fully written"
    assert torch.equal(out, gemv), f"seed {SEED}: tensor-core output differs from the dp4a GEMV's"
    _check_reference(out, x, w8, scb, bias, threshold)


class _CountingLib:
    """Delegates to the loaded library, counting calls of one launcher."""

    def __init__(self, real, name: str) -> None:
        self._real, self._name, self.calls = real, name, 0

    def __getattr__(self, attr: str):
        fn = getattr(self._real, attr)
        if attr != self._name:
            return fn

        def counted(*args):
            self.calls += 1
            return fn(*args)

        return counted


def _tc_on(monkeypatch) -> _CountingLib:
    counting = _CountingLib(lib.load(), "shardq_int8_gemm_tc")
    monkeypatch.setattr(cuda_ops, "INT8_TC", True)
    monkeypatch.setattr(cuda_ops, "INT8_TC_MAX_M", 64)  # the kernel's whole range, past the default cap of 32
    monkeypatch.setattr(cuda_ops._lib, "load", lambda: counting)
    return counting


@pytest.mark.parametrize("k,n,m,dtype,threshold,with_bias", [c for c in _grid() if c.values[0] != BIG[0]])
def test_op_takes_tc_path(monkeypatch, k, n, m, dtype, threshold, with_bias):
    x, w8, scb, bias = _inputs(k, n, m, dtype, with_bias, "op")
    _buf, p = _prepare(x, threshold)
    direct = _nan_out(m, n, dtype)
    assert _launch("shardq_int8_gemm_tc", x, w8, scb, bias, p, direct) == 0
    counting = _tc_on(monkeypatch)
    out = torch.ops.shardq.int8_linear(x, w8, scb, bias, threshold)
    assert counting.calls == 1, "the op did not call the tensor-core kernel"
    assert torch.equal(out, direct)
    _check_reference(out, x, w8, scb, bias, threshold)


@pytest.mark.parametrize("m", [1, 65, 128])
def test_op_outside_tc_range(monkeypatch, m):
    """M = 1 keeps the one-launch kernel and M > 64 the _int_mm path, with the switch on."""
    x, w8, scb, bias = _inputs(1024, 1000, m, torch.float16, True, "range")
    counting = _tc_on(monkeypatch)
    out = torch.ops.shardq.int8_linear(x, w8, scb, bias, 6.0)
    assert counting.calls == 0
    _check_reference(out, x, w8, scb, bias, 6.0)


def test_refusals_write_nothing():
    """Shapes and pointers the kernel does not take: cudaErrorNotSupported, nothing launched, output untouched."""
    k, n = 1024, 1000
    x, w8, scb, bias = _inputs(k, n, 65, torch.float16, True, "refuse")
    _buf, p = _prepare(x, 6.0)
    wide = torch.zeros(n, k + 16, dtype=torch.int8, device=DEV)
    cases = {
        "K % 32 != 0": dict(k=k - 16),
        "M = 65": dict(m=65),
        "M = 0": dict(m=0),
        "q misaligned": dict(q_ptr=p["q"] + 1),
        "w misaligned": dict(w_ptr=wide.data_ptr() + 8),
        "fp32 output": dict(dtype_code=cuda_ops.DTYPE_CODES[torch.float32]),
    }
    for name, kw in cases.items():
        out = _nan_out(65, n, torch.float16)
        rc = _launch("shardq_int8_gemm_tc", x, w8, scb, bias, p, out, **kw)
        torch.cuda.synchronize()
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{name}: rc {rc}"
        assert torch.isnan(out).all(), f"{name}: output written"


def test_cuda_graph_capture(monkeypatch):
    counting = _tc_on(monkeypatch)
    g = _gen("graph")
    n, k = 1024, 2048
    w8, scb = ops.reference("quantize_int8_rowwise")(torch.randn(n, k, device=DEV, generator=g))
    for m in (5, 16, 64):
        x = torch.randn(m, k, device=DEV, dtype=torch.float16, generator=g)
        fn = lambda t: torch.ops.shardq.int8_linear(t, w8, scb, None, 6.0)  # noqa: E731
        out, fresh = graph_replay(fn, x, g)
        assert torch.equal(out, fn(fresh)), f"M={m}: graph replay differs from eager"
    assert counting.calls >= 9


@pytest.mark.parametrize("m,routed", [(1, False), (2, True), (4, True), (5, True), (32, True), (33, False)])
def test_default_routing(monkeypatch, m, routed):
    """By default int8_linear sends 2 <= M <= 32 to the tensor-core kernel (where it measured faster)."""
    if os.environ.get("SHARDQ_INT8_TC") == "0":
        pytest.skip("SHARDQ_INT8_TC=0 turns the tensor-core kernel off")
    x, w8, scb, bias = _inputs(4096, 1000, m, torch.float16, True, "route")
    counting = _CountingLib(lib.load(), "shardq_int8_gemm_tc")
    monkeypatch.setattr(cuda_ops._lib, "load", lambda: counting)
    out = torch.ops.shardq.int8_linear(x, w8, scb, bias, 6.0)
    assert counting.calls == int(routed)
    _check_reference(out, x, w8, scb, bias, 6.0)
