"""The shardq::* ops: schemas, reference kernels against fp32/fp64 references, fake kernels, opcheck."""

from __future__ import annotations

import pytest
import torch

import shardq.ops  # noqa: F401
from shardq.quant import blockwise, codebooks, int8

OPS = {
    "quantize_4bit": "shardq::quantize_4bit(Tensor A, Tensor code, int blocksize) -> (Tensor packed, Tensor absmax)",
    "dequantize_4bit": "shardq::dequantize_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, "
                       "int[] shape, ScalarType dtype) -> Tensor",
    "gemm_4bit": "shardq::gemm_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
                 "int out_features, int in_features, Tensor? nested_absmax, Tensor? nested_code, "
                 "float nested_offset, Tensor? bias) -> Tensor",
    "quantize_int8_rowwise": "shardq::quantize_int8_rowwise(Tensor A) -> (Tensor q, Tensor scale)",
    "int8_linear": "shardq::int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias, "
                   "float threshold) -> Tensor",
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", sorted(OPS))
def test_schema_matches_design(name):
    assert str(getattr(torch.ops.shardq, name).default._schema) == OPS[name]


def test_import_is_cheap_and_gpu_free():
    import subprocess
    import sys
    code = ("import sys, torch; torch.cuda.is_available = None; import shardq.ops; "
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
    tol = 4 * max(_rel(same_precision, ref), 1e-6)
    assert _rel(out, ref) <= tol
