"""The shardq::* ops: schemas, reference kernels against fp32/fp64 references, fake kernels, opcheck."""

from __future__ import annotations

import pytest
import torch

import shardq.kernels
import shardq.kernels.ops
from shardq.formats import blockwise, codebooks, int8
from _f_numerics import rel_err

OPS = {
    "quantize_4bit": "shardq::quantize_4bit(Tensor A, Tensor code, int blocksize) -> (Tensor packed, Tensor absmax)",
    "dequantize_4bit": "shardq::dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, "
                       "int[] shape, ScalarType dtype) -> Tensor",
    "gemm_4bit": "shardq::gemm_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
                 "int out_features, int in_features, Tensor? nested_absmax, Tensor? nested_code, "
                 "float nested_offset, Tensor? bias) -> Tensor",
    "grouped_gemm_4bit": "shardq::grouped_gemm_4bit(Tensor x, Tensor offsets, Tensor packed, Tensor absmax, "
                         "Tensor code, int blocksize, int out_features, Tensor? nested_absmax, Tensor? nested_code, "
                         "Tensor? nested_offset) -> Tensor",
    "quantize_int8_rowwise": "shardq::quantize_int8_rowwise(Tensor A) -> (Tensor q, Tensor scale)",
    "int8_linear": "shardq::int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias, "
                   "float threshold) -> Tensor",
}



@pytest.mark.parametrize("name", sorted(OPS))
def test_schema_matches_design(name):
    assert str(getattr(torch.ops.shardq, name).default._schema) == OPS[name]


def test_import_is_cheap_and_gpu_free():
    import subprocess
    import sys
    code = ("import sys, torch; torch.cuda.is_available = None; import shardq.kernels.ops; "
            "assert not any(m.endswith('_C_shardq') or m.startswith('shardq.kernels._') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,bs", [((7, 13), 64), ((64, 96), 32), ((3, 1000), 256), ((5, 129), 128)])
def test_gemm_4bit_matches_dequantized_reference(qt, dtype, shape, bs):
    g = torch.Generator().manual_seed(hash((qt, shape, bs)) % 2**31)
    w = torch.randn(shape, generator=g)
    w[0, 0] = 40.0  # an outlier weight
    x = torch.randn(2, 3, shape[1], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    code = codebooks.code_4bit(qt)
    packed, absmax = torch.ops.shardq.quantize_4bit(w, code, bs)
    out = torch.ops.shardq.gemm_4bit(x, packed, absmax, code, bs, shape[0], shape[1], None, None, 0.0, bias)
    assert out.dtype == dtype and out.shape == (2, 3, shape[0])
    wdq = blockwise.dequantize_4bit_ref(packed, absmax, code, bs, shape, torch.float64)
    ref = x.double() @ wdq.T + bias.double()
    same_precision = (x.double() @ wdq.to(dtype).double().T + bias.double()).to(dtype)
    tol = 4 * max(rel_err(same_precision, ref), 1e-6)
    assert rel_err(out, ref) <= tol


def test_gemm_4bit_with_double_quant_equals_dequantized_absmax():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(300, 130, generator=g)  # 610 blocks of 64: three nested blocks of 256
    code = codebooks.code_4bit("nf4")
    packed, absmax = torch.ops.shardq.quantize_4bit(w, code, 64)
    dq = blockwise.quantize_absmax(absmax, codebooks.dynamic_map())
    x = torch.randn(4, 130, generator=g)
    out = torch.ops.shardq.gemm_4bit(x, packed, dq.q, code, 64, 300, 130, dq.nested_absmax, dq.code,
                                     dq.offset.item(), None)
    real = blockwise.dequantize_absmax(dq.q, dq.nested_absmax, dq.code, dq.offset.item())
    wdq = torch.ops.shardq.dequantize_4bit(packed, real, code, 64, [300, 130], torch.float64)
    assert rel_err(out, x.double() @ wdq.T) < 1e-6


def _samples():
    g = torch.Generator().manual_seed(5)
    code = codebooks.code_4bit("fp4")
    w = torch.randn(12, 40, generator=g)
    packed, absmax = blockwise.quantize_4bit_ref(w, code, 32)
    dq = blockwise.quantize_absmax(absmax, codebooks.dynamic_map())
    q8, scb = int8.quantize_rowwise_ref(w)
    x = torch.randn(3, 40, generator=g)
    x[:, 4] *= 20
    b = torch.randn(12, generator=g)
    return {
        "quantize_4bit": [(w, code, 32), (w.half(), code, 64)],
        "dequantize_4bit": [(packed, absmax, code, 32, [12, 40], torch.bfloat16)],
        "gemm_4bit": [(x, packed, absmax, code, 32, 12, 40, None, None, 0.0, b),
                      (x.bfloat16(), packed, dq.q, code, 32, 12, 40, dq.nested_absmax, dq.code, dq.offset.item(), None)],
        "grouped_gemm_4bit": [(x, torch.tensor([0, 2, 2, 3]), packed.reshape(1, -1).expand(3, -1), absmax.expand(3, -1),
                               code.expand(3, 16), 32, 12, None, None, None)],
        "quantize_int8_rowwise": [(w,), (x.half(),)],
        "int8_linear": [(x, q8, scb, b, 6.0), (x.half(), q8, scb, None, 0.0)],
    }


@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(name):
    op = getattr(torch.ops.shardq, name).default
    for args in _samples()[name]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_fake_kernels_give_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 40)
        packed = torch.empty(240, 1, dtype=torch.uint8)
        out = torch.ops.shardq.gemm_4bit(x, packed, torch.empty(15), torch.empty(16), 32, 12, 40, None, None, 0.0, None)
        assert out.shape == (2, 5, 12) and out.dtype == x.dtype
        q, s = torch.ops.shardq.quantize_int8_rowwise(torch.empty(7, 40, dtype=torch.float16))
        assert q.dtype == torch.int8 and s.shape == (7,) and s.dtype == torch.float32
        p, a = torch.ops.shardq.quantize_4bit(torch.empty(7, 41), torch.empty(16), 64)
        assert p.shape == (144, 1) and a.shape == (5,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(OPS))
def test_cuda_matches_cpu_reference(name):
    for args in _samples()[name]:
        cpu = getattr(torch.ops.shardq, name)(*args)
        gpu = getattr(torch.ops.shardq, name)(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        cpu = cpu if isinstance(cpu, tuple) else (cpu,)
        gpu = gpu if isinstance(gpu, tuple) else (gpu,)
        for c, d in zip(cpu, gpu):
            assert c.dtype == d.dtype and c.shape == d.shape
            if c.is_floating_point():
                tol = 1e-5 if c.dtype == torch.float32 else 2e-2
                assert rel_err(d.cpu(), c) <= tol, name
            else:
                assert (d.cpu().int() != c.int()).float().mean() < 1e-3, name


def test_quantized_layers_compile_without_graph_breaks():
    from shardq.config import QuantConfig
    from shardq.quant.linear import Linear4bit, Linear8bit

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    x[:, 3] = 9.0  # an outlier column for int8
    for layer in (Linear4bit.from_linear(lin, QuantConfig(method="nf4", double_quant=True)),
                  Linear8bit.from_linear(lin, QuantConfig(method="int8"))):
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), layer(x))


def test_call_takes_the_op_off_the_gpu(monkeypatch):
    """shardq.kernels.ops.call on CPU tensors runs the op (its CPU kernel); the direct CUDA kernel is never asked for."""
    monkeypatch.setattr(shardq.kernels.ops, "cuda_kernel", lambda name: pytest.fail(f"direct path taken for {name}"))
    for name, cases in _samples().items():
        for args in cases:
            got, want = shardq.kernels.ops.call(name, *args), getattr(torch.ops.shardq, name)(*args)
            for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert torch.equal(g, w), name


def test_call_sends_direct_inputs_to_the_registered_kernel(monkeypatch):
    """When the input qualifies (a plain eager CUDA tensor needing no gradient) the op's CUDA implementation is
    called with the same arguments, bypassing the dispatcher."""
    seen = []
    monkeypatch.setattr(shardq.kernels.ops, "_direct", lambda x: True)
    monkeypatch.setattr(shardq.kernels.ops, "cuda_kernel", lambda name: lambda *a: seen.append((name, a)) or "ran")
    args = _samples()["int8_linear"][0]
    assert shardq.kernels.ops.call("int8_linear", *args) == "ran"
    assert seen == [("int8_linear", args)]
    from shardq.kernels.cuda_ops import KERNELS

    monkeypatch.undo()
    assert set(KERNELS) == set(OPS) and all(shardq.kernels.ops.cuda_kernel(n) is KERNELS[n] for n in OPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_call_on_cuda_equals_the_op_and_leaves_autograd_to_it():
    for name in ("gemm_4bit", "int8_linear", "dequantize_4bit"):
        for args in _samples()[name]:
            cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
            assert shardq.kernels.ops._direct(cuda[0])
            assert torch.equal(shardq.kernels.ops.call(name, *cuda), getattr(torch.ops.shardq, name)(*cuda)), name
    x = torch.randn(3, 40, device="cuda", requires_grad=True)
    assert not shardq.kernels.ops._direct(x)
    with torch.no_grad():
        assert shardq.kernels.ops._direct(x)
