"""LLM.int8(): row-wise quantization and the mixed-precision matmul, against fp64 references and bitsandbytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import shardq.kernels.ops  # noqa: F401
from shardq.formats import int8
from _f_numerics import rel_err

FIX = Path(__file__).parent / "fixtures" / "bnb"



def _spec_int8_linear(x, w, scb, bias, threshold):
    """DESIGN.md's int8_linear written out independently, in fp64 wherever the spec does not fix the precision."""
    x2 = x.reshape(-1, x.shape[-1])
    outl = (x2.abs() > threshold).any(0) if threshold > 0 else torch.zeros(x2.shape[1], dtype=torch.bool)
    xi = torch.where(outl, torch.zeros_like(x2), x2).float()
    rmax = xi.abs().amax(1, keepdim=True)
    qx = torch.round(xi * (127.0 / rmax.clamp_min(1e-38)))
    acc = qx.double() @ w.double().T  # exact integers
    main = acc * (rmax.double() * scb.double()[None, :]) / 127.0**2
    wd = (w.float() * (scb / 127.0)[:, None]).to(x.dtype)
    side = (x2[:, outl] @ wd[:, outl].T).double() if outl.any() else 0.0
    out = main + side + (bias.double() if bias is not None else 0.0)
    return out.reshape(*x.shape[:-1], w.shape[0])


def _weights(out_f, in_f, g):
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[::7, 3] *= 20  # weight outliers
    return w


SUFFIXES = [s for s in ("", "_cuda") if (FIX / f"int8{s}.safetensors").exists()]


def _same_codes(ours: torch.Tensor, theirs: torch.Tensor, exact: bool) -> bool:
    """Equal, or (CUDA: a fast reciprocal may round a value just off a .5 boundary) off by one rarely."""
    if exact:
        return torch.equal(ours, theirs)
    diff = (ours.int() - theirs.int()).abs()
    return bool(diff.max() <= 1) and (diff > 0).float().mean().item() < 5e-3


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_rowwise_quantization_matches_bitsandbytes(suffix):
    f = load_file(FIX / f"int8{suffix}.safetensors")
    q, s = torch.ops.shardq.quantize_int8_rowwise(f["W"])
    assert _same_codes(q, f["CB"], not suffix) and torch.equal(s, f["SCB"])
    q, s = torch.ops.shardq.quantize_int8_rowwise(f["x"].reshape(-1, f["x"].shape[-1]))
    assert _same_codes(q, f["x_q"], not suffix) and torch.equal(s, f["x_scale"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 9), (5, 64), (3, 7, 130)])
def test_rowwise_round_trip(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    A = (torch.randn(shape, generator=g) * 3).to(dtype)
    q, s = torch.ops.shardq.quantize_int8_rowwise(A)
    assert q.dtype == torch.int8 and q.shape == A.shape and s.shape == A.shape[:-1] and s.dtype == torch.float32
    assert torch.equal(s, A.float().abs().amax(-1))
    assert (q.abs() == 127).any(-1).all()  # each row's absmax maps to +-127
    back = int8.dequantize_rowwise_ref(q, s)
    assert torch.all((back - A.float()).abs() <= s.unsqueeze(-1) / 254 * (1 + 1e-5))


def test_int32_accumulation_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (9, 8192), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 8192), generator=g, dtype=torch.int8)
    a[0] = 127
    b[0] = 127  # 8192 * 127 * 127 > 2**24: fp32 could not hold it exactly
    exact = a.long() @ b.long().T
    assert torch.equal(int8.int8_matmul_exact(a, b), exact.to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("lead", [(1,), (4,), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_follows_the_spec(dtype, threshold, lead, with_bias):
    g = torch.Generator().manual_seed(hash((str(dtype), threshold, lead, with_bias)) % 2**31)
    w = _weights(24, 80, g)
    q, scb = torch.ops.shardq.quantize_int8_rowwise(w)
    x = torch.randn(*lead, 80, generator=g)
    x[..., [5, 50]] *= 10  # outlier feature columns
    x = x.to(dtype)
    bias = (torch.randn(24, generator=g) * 0.1).to(dtype) if with_bias else None
    out = torch.ops.shardq.int8_linear(x, q, scb, bias, threshold)
    assert out.dtype == dtype and out.shape == (*lead, 24)
    spec = _spec_int8_linear(x, q, scb, bias, threshold)
    eps = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(out, spec) <= eps


def test_outlier_decomposition_helps_and_is_a_no_op_without_outliers():
    g = torch.Generator().manual_seed(3)
    w = _weights(64, 256, g)
    q, scb = torch.ops.shardq.quantize_int8_rowwise(w)
    wdq = int8.dequantize_rowwise_ref(q, scb).double()
    x = torch.randn(16, 256, generator=g)
    calm = torch.ops.shardq.int8_linear(x.clamp(-5.9, 5.9), q, scb, None, 6.0)
    assert torch.equal(calm, torch.ops.shardq.int8_linear(x.clamp(-5.9, 5.9), q, scb, None, 0.0))
    x[:, [10, 100, 200]] *= 25
    exact = x.double() @ wdq.T
    with_dec = rel_err(torch.ops.shardq.int8_linear(x, q, scb, None, 6.0), exact)
    without = rel_err(torch.ops.shardq.int8_linear(x, q, scb, None, 0.0), exact)
    assert with_dec < without / 3, (with_dec, without)
    assert int8.outlier_columns(x, 6.0).tolist() == [10, 100, 200]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_matches_bitsandbytes_layer_outputs(suffix):
    f = load_file(FIX / f"int8{suffix}.safetensors")
    x, bias = f["x"], f["bias"]
    exact = x.double() @ f["W"].double().T + bias.double()
    for thr in (0.0, 6.0):
        ours = torch.ops.shardq.int8_linear(x, f["CB"], f["SCB"], bias, thr)
        theirs = f[f"out_thr{thr:g}"]
        assert ours.dtype == theirs.dtype == torch.float16
        # bitsandbytes' CPU backend rounds slightly differently; both must stay int8-accurate
        assert rel_err(ours, exact) < 0.03 and rel_err(theirs, exact) < 0.03
    assert rel_err(torch.ops.shardq.int8_linear(x, f["CB"], f["SCB"], bias, 6.0), f["out_thr6"]) < 5e-3


def test_int8_linear_rejects_bad_inputs():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="weight must be int8"):
        torch.ops.shardq.int8_linear(torch.randn(2, 8), q.float(), torch.ones(4), None, 6.0)
    with pytest.raises(RuntimeError, match="x has 9 features, weight takes 8"):
        torch.ops.shardq.int8_linear(torch.randn(2, 9), q, torch.ones(4), None, 6.0)


def test_chunked_reference_equals_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(37, 50, generator=g)
    x = torch.randn(6, 50, generator=g)
    x[:, 7] *= 20
    q, s = int8.quantize_rowwise_ref(w)
    out = int8.int8_linear_ref(x, q, s, None, 6.0)
    monkeypatch.setattr(int8, "CHUNK_ELEMS", 120)  # 2 rows per step, the last one short
    q2, s2 = int8.quantize_rowwise_ref(w)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    assert torch.equal(int8.int8_linear_ref(x, q, s, None, 6.0), out)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 7, 3), (5, 4097, 13), (64, 33, 1000), (0, 8, 4), (3, 0, 2),
                                   (2, 65536, 4)])
def test_int8_matmul_exact_is_an_exact_integer_product(m, k, n):
    """Extreme int8 values included: the sum of k products of +-127/-128 stays exact (int32)."""
    g = torch.Generator().manual_seed(1000 + m * 31 + k)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    if m and k:
        a[0] = -128
        b[:, 0] = -128
    got = int8.int8_matmul_exact(a, b)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, (a.long() @ b.long().T).int())
