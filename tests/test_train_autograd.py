"""Backward of the quantized ops (shardq.kernels.autograd) on the CPU reference: gradcheck in fp64, the chunked
transposed product against one dense product, bias gradients, opcheck's autograd tests."""

from __future__ import annotations

import pytest
import torch

import shardq.kernels.ops  # registers the ops, then their autograd
from shardq.config import QuantConfig
from shardq.formats import blockwise, codebooks, int8
from shardq.kernels import autograd
from shardq.quant.linear import Linear4bit, Linear8bit


def _4bit(shape, qt="nf4", bs=64, double=False, seed=0):
    """(packed, absmax, code, nested...) args of gemm_4bit for a random weight, and its fp64 dequantization."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    code = codebooks.code_4bit(qt)
    packed, absmax = torch.ops.shardq.quantize_4bit(w, code, bs)
    nested = (None, None, 0.0)
    real = absmax
    if double:
        dq = blockwise.quantize_absmax(absmax, codebooks.dynamic_map())
        nested, absmax = (dq.nested_absmax, dq.code, dq.offset.item()), dq.q
        real = blockwise.dequantize_absmax(dq.q, dq.nested_absmax, dq.code, dq.offset.item())
    wdq = blockwise.dequantize_4bit_ref(packed, real, code, bs, list(shape), torch.float64)
    return (packed, absmax, code, bs, shape[0], shape[1], *nested), wdq


@pytest.mark.parametrize("qt,double", [("nf4", False), ("fp4", False), ("nf4", True)])
@pytest.mark.parametrize("shape,bs", [((12, 40), 32), ((7, 13), 64), ((5, 129), 128)])
def test_gemm_4bit_gradcheck(qt, double, shape, bs):
    args, _ = _4bit(shape, qt, bs, double)
    x = torch.randn(2, 3, shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: torch.ops.shardq.gemm_4bit(x, *args, b), (x, bias))


def test_int8_gradcheck_is_the_straight_through_product():
    """With every input column an outlier (threshold tiny) LLM.int8() is x @ W_deq.T, linear in x: gradcheck holds.
    The reference sums in fp32 by design, so the finite differences take a large step (exact for a linear map)."""
    w = torch.randn(9, 24, dtype=torch.float64)
    q, scb = torch.ops.shardq.quantize_int8_rowwise(w)
    x = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: torch.ops.shardq.int8_linear(x, q, scb, b, 1e-12)
    assert torch.autograd.gradcheck(fn, (x, bias), eps=1e-2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_grad_equals_dequantized_weight_product(threshold, dtype):
    w = torch.randn(33, 70)
    q, scb = torch.ops.shardq.quantize_int8_rowwise(w)
    x = (torch.randn(3, 5, 70) * 4).to(dtype).requires_grad_()  # some columns above 6: the outlier split runs
    bias = torch.randn(33, dtype=dtype, requires_grad=True)
    out = torch.ops.shardq.int8_linear(x, q, scb, bias, threshold)
    g = torch.randn_like(out)
    out.backward(g)
    wdq = int8.dequantize_rowwise_ref(q, scb, dtype)
    torch.testing.assert_close(x.grad, g @ wdq)
    torch.testing.assert_close(bias.grad, g.float().sum((0, 1)).to(dtype))


@pytest.mark.parametrize("shape,bs", [((40, 24), 64), ((150, 13), 64), ((50, 129), 32)])
def test_4bit_chunks_equal_one_dense_product(monkeypatch, shape, bs):
    """Small chunk budget: several row chunks (block-aligned, blocks straddling rows included) sum to g @ W."""
    args, wdq = _4bit(shape, "nf4", bs, True)
    monkeypatch.setattr(autograd, "DEQUANT_CHUNK_BYTES", 8 * shape[1] * 8)
    rows = autograd.chunk_rows(shape[0], shape[1], 8, bs)
    assert rows < shape[0] and (rows * shape[1]) % bs == 0
    x = torch.randn(6, shape[1], dtype=torch.float64, requires_grad=True)
    out = torch.ops.shardq.gemm_4bit(x, *args, None)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, g @ wdq, rtol=1e-12, atol=1e-12)


def test_int8_chunks_equal_one_dense_product(monkeypatch):
    w = torch.randn(41, 30)
    q, scb = torch.ops.shardq.quantize_int8_rowwise(w)
    monkeypatch.setattr(autograd, "DEQUANT_CHUNK_BYTES", 4 * 30 * 8)
    x = torch.randn(5, 30, requires_grad=True)
    out = torch.ops.shardq.int8_linear(x, q, scb, None, 6.0)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad, g @ int8.dequantize_rowwise_ref(q, scb), rtol=1e-5, atol=1e-5)


def test_frozen_inputs_get_no_gradient_and_bias_only_when_asked():
    args, wdq = _4bit((12, 40), bs=32)
    x = torch.randn(3, 40)
    bias = torch.randn(12, requires_grad=True)
    torch.ops.shardq.gemm_4bit(x, *args, bias).sum().backward()
    assert x.grad is None
    torch.testing.assert_close(bias.grad, torch.full((12,), 3.0))
    frozen = torch.randn(12)
    x.requires_grad_()
    torch.ops.shardq.gemm_4bit(x, *args, frozen).sum().backward()
    assert frozen.grad is None
    torch.testing.assert_close(x.grad, torch.ones(3, 12) @ wdq.float())


@pytest.mark.parametrize(
    "cls,cfg",
    [
        (Linear4bit, QuantConfig(method="nf4", double_quant=True)),
        (Linear4bit, QuantConfig(method="fp4", compute_dtype=torch.float32)),
        (Linear8bit, QuantConfig(method="int8", threshold=6.0)),
    ],
)
def test_layers_backward_through_their_forward(cls, cfg):
    """The layers' forwards (compute-dtype casts, `ops.call`) keep the graph: grad_x = g @ W_deq."""
    torch.manual_seed(0)
    layer = cls.from_linear(torch.nn.Linear(64, 48).to(torch.bfloat16), cfg)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    ref = (g.float() @ layer.dequantized_weight(torch.float32)).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, ref, rtol=2e-2, atol=2e-2)


def test_opcheck_autograd_registration():
    args, _ = _4bit((12, 40), bs=32, double=True)
    x = torch.randn(2, 5, 40, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    w = torch.randn(12, 40)
    q, scb = torch.ops.shardq.quantize_int8_rowwise(w)
    cases = [
        (torch.ops.shardq.gemm_4bit.default, (x, *args, b)),
        (torch.ops.shardq.int8_linear.default, (x, q, scb, b, 6.0)),
    ]
    for op, sample in cases:
        torch.library.opcheck(
            op,
            sample,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


@pytest.mark.parametrize("cls,cfg", [(Linear4bit, QuantConfig(method="nf4")), (Linear8bit, QuantConfig(method="int8"))])
def test_trained_bias_goes_through_the_op(monkeypatch, cls, cfg):
    """`ops.call` sends inputs needing no gradient straight to the CUDA kernel (no autograd): a trained bias must
    not take that path, a frozen one still does."""
    layer = cls.from_linear(torch.nn.Linear(32, 16), cfg)
    calls: list[str] = []

    def call(name, *args):
        calls.append(name)
        return getattr(torch.ops.shardq, name)(*args)

    monkeypatch.setattr(shardq.kernels.ops, "call", call)
    layer(torch.randn(2, 32))
    assert len(calls) == 1
    layer.bias.requires_grad_(True)
    layer(torch.randn(2, 32)).sum().backward()
    assert len(calls) == 1
    torch.testing.assert_close(layer.bias.grad, torch.full((16,), 2.0))


@pytest.mark.parametrize("double", [False, True])
def test_eager_function_equals_the_op_and_gradchecks(double):
    """`ops.call` with an input that needs a gradient runs the same formulas as a plain autograd.Function (no
    dispatcher, so no torch.library autograd layer per call): same output and gradient as the op."""
    args, _ = _4bit((24, 64), "nf4", 32, double, seed=3)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(24, dtype=torch.float64)
    out = shardq.kernels.ops.call("gemm_4bit", x, *args, bias)
    assert type(out.grad_fn).__name__ == "gemm_4bit_functionBackward"
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.ops.shardq.gemm_4bit(x2, *args, bias)
    assert torch.equal(out, ref) and torch.equal(grad, torch.autograd.grad(ref.square().sum(), x2)[0])
    assert torch.autograd.gradcheck(lambda x: shardq.kernels.ops.call("gemm_4bit", x, *args, bias), (x,))
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    scb = torch.rand(24, dtype=torch.float32) * 3
    xi = torch.randn(5, 64, dtype=torch.float32, requires_grad=True)
    out = shardq.kernels.ops.call("int8_linear", xi, w, scb, None, 0.0)
    assert type(out.grad_fn).__name__ == "int8_linear_functionBackward"
    xr = xi.detach().clone().requires_grad_(True)
    ref = torch.ops.shardq.int8_linear(xr, w, scb, None, 0.0)
    g1 = torch.autograd.grad(out.sum(), xi)[0]
    assert torch.equal(out, ref) and torch.equal(g1, torch.autograd.grad(ref.sum(), xr)[0])
