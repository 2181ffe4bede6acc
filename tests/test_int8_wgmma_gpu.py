"""csrc/int8_gemm_wgmma.cu (LLM.int8() for M > 32 on Hopper: the int8 GEMM on the warpgroup MMA with the epilogue
fused) against the unfused path it replaces (torch._int_mm + the epilogue kernel) and the reference. Skipped unless
the GPU is compute capability 9.0.

Fresh random inputs every run, outlier columns in x, outputs poisoned with NaN before each launch. Without
outliers (threshold 0) the fused kernel's output is the unfused path's bit for bit (same int32 sums, same epilogue
expression); with outliers their part is summed on the tensor cores in another order, so the two agree to fp32
rounding and both stay within the reference's tolerance."""

from __future__ import annotations

import pytest
import torch

import shardq.kernels.ops  # noqa: F401
from shardq.kernels import cuda_ops, lib, ops
from test_kernels_gpu import DEV, SEED, _gen, _poison, graph_replay
from _f_numerics import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs a compute capability 9.0 GPU")]


@pytest.fixture
def calls(monkeypatch):
    """Return codes of the fused launcher's calls (0: it ran, 801: it refused and the unfused path ran)."""
    loaded = lib.load()
    assert loaded is not None, f"kernels library unavailable: {lib.error()}"
    seen: list[int] = []
    real = loaded.shardq_int8_gemm_wgmma

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(loaded, "shardq_int8_gemm_wgmma", spy)
    return seen


def _inputs(k: int, n: int, m: int, dtype: torch.dtype, every: int, key: str, bias: bool = True):
    g = _gen(key, k, n, m, every)
    w8, scb = ops.reference("quantize_int8_rowwise")(torch.randn(n, k, device=DEV, generator=g))
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    x[:, ::every] *= 20.0
    b = torch.randn(n, device=DEV, generator=g).to(dtype) if bias else None
    return x, w8, scb, b


def _run(monkeypatch, fused: bool, x, w8, scb, b, threshold: float) -> torch.Tensor:
    monkeypatch.setattr(cuda_ops, "INT8_WGMMA", fused)
    _poison(x.shape[0] * w8.shape[0] * 4)
    out = torch.ops.shardq.int8_linear(x, w8, scb, b, threshold)
    assert torch.isfinite(out).all(), "output not fully written"
    return out


SHAPES = [(128, 8, 33), (1024, 1000, 100), (1024, 1000, 256), (4096, 4104, 129), (11008, 4096, 300),
          (4096, 11008, 128), (8192, 28672, 512), (4096, 4096, 4096), (2048, 260, 1000), (256, 511, 257)]


@pytest.mark.parametrize("k,n,m", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_outliers_bit_equal_to_unfused(monkeypatch, calls, k, n, m, dtype):
    x, w8, scb, b = _inputs(k, n, m, dtype, max(1, k // 8), "i8wg0", bias=m % 2 == 1)
    fused = _run(monkeypatch, True, x, w8, scb, b, 0.0)
    assert calls == [0], f"fused kernel not taken: {calls}"
    unfused = _run(monkeypatch, False, x, w8, scb, b, 0.0)
    assert torch.equal(fused, unfused), f"seed {SEED}: rel diff {rel_err(fused, unfused):.3e}"


@pytest.mark.parametrize("k,n,m,every", [(1024, 1000, 64, 128), (4096, 4104, 300, 512), (2048, 1032, 33, 100),
                                         (1024, 1000, 200, 8), (4096, 4096, 256, 3), (8192, 28672, 256, 1024)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_outliers_against_reference(monkeypatch, calls, k, n, m, every, dtype):
    """8 to 1366 outlier columns: up to 32 staged and summed on the tensor cores, the rest read from x and W."""
    x, w8, scb, b = _inputs(k, n, m, dtype, every, "i8wg6")
    fused = _run(monkeypatch, True, x, w8, scb, b, 6.0)
    assert calls == [0], f"fused kernel not taken: {calls}"
    unfused = _run(monkeypatch, False, x, w8, scb, b, 6.0)
    ref = ops.reference("int8_linear")(x, w8, scb, b, 6.0).float()
    eps = torch.finfo(dtype).eps
    assert rel_err(fused, ref) <= 2 * eps, f"seed {SEED}: rel err {rel_err(fused, ref):.3e} vs reference"
    assert rel_err(fused, unfused) <= eps, f"seed {SEED}: rel diff {rel_err(fused, unfused):.3e} vs unfused"


@pytest.mark.parametrize("k,n,m,dtype", [(4097, 1000, 64, torch.float16), (1088, 1000, 64, torch.float16),
                                         (1024, 1000, 64, torch.float32)])
def test_refused_shapes_take_the_unfused_path(monkeypatch, calls, k, n, m, dtype):
    """K % 128 != 0 or fp32 activations: the launcher refuses (nothing launched) and the unfused path is exact."""
    x, w8, scb, b = _inputs(k, n, m, dtype, 50, "i8wgr")
    out = _run(monkeypatch, True, x, w8, scb, b, 6.0)
    assert calls == [lib.CUDA_ERROR_NOT_SUPPORTED]
    ref = ops.reference("int8_linear")(x, w8, scb, b, 6.0).float()
    assert rel_err(out, ref) <= 2 * max(torch.finfo(dtype).eps, 1e-6)


def test_graph_capture(monkeypatch, calls):
    x, w8, scb, b = _inputs(4096, 4104, 300, torch.float16, 64, "i8wgg")
    monkeypatch.setattr(cuda_ops, "INT8_WGMMA", True)
    fn = lambda xx: torch.ops.shardq.int8_linear(xx, w8, scb, b, 6.0)  # noqa: E731
    replayed, fresh = graph_replay(fn, x, _gen("i8wgg2"))
    assert torch.equal(replayed, fn(fresh))
    assert calls and all(rc == 0 for rc in calls)
