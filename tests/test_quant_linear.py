"""Linear4bit / Linear8bit: construction (from nn.Linear, empty on meta), forwards, dequantize, model
conversion with skip modules, and the stored-bytes footprint against DESIGN.md's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shardq.config import QuantConfig
from shardq.quant import linear as ql
from shardq.quant.linear import Linear4bit, Linear8bit, memory_footprint
from shardq.quant.convert import dequantize_model, quantize_model
from _f_numerics import rel_err

CFGS = {
    "int8": QuantConfig(method="int8"),
    "nf4": QuantConfig(method="nf4"),
    "fp4": QuantConfig(method="fp4", blocksize=128),
    "nf4-dq": QuantConfig(method="nf4", double_quant=True),
    "fp4-dq-bf16": QuantConfig(method="fp4", double_quant=True, compute_dtype=torch.bfloat16),
}



def _cls(cfg):
    return Linear8bit if cfg.method == "int8" else Linear4bit


def _linear(in_f, out_f, bias, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    return lin


@pytest.mark.parametrize("key", sorted(CFGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dequantized_weight(key, dtype, bias):
    cfg = CFGS[key]
    lin = _linear(96, 40, bias, 0)
    q = _cls(cfg).from_linear(lin, cfg)
    x = torch.randn(2, 3, 96, dtype=dtype)
    out = q(x)
    assert out.dtype == dtype and out.shape == (2, 3, 40)
    wdq = q.dequantized_weight(torch.float64)
    ref = x.double() @ wdq.T + (lin.bias.double() if bias else 0)
    # int8 also quantizes activations (~1/254 of the row absmax); 4-bit runs in the compute dtype
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
    limit = tol[cfg.compute_dtype or dtype] if cfg.method != "int8" else 2e-2
    assert rel_err(out, ref) < limit
    assert rel_err(out, lin.double()(x.double())) < (0.15 if cfg.is_4bit else 2e-2)


@pytest.mark.parametrize("key", sorted(CFGS))
def test_empty_on_meta_then_load_from_float(key):
    cfg = CFGS[key]
    lin = _linear(70, 33, True, 1, torch.float16)
    m = ql.empty_quantized(70, 33, True, cfg, device="meta", dtype=torch.float16)
    assert all(t.device.type == "meta" for t in list(m.buffers()) + list(m.parameters()))
    assert ql.quantized_bytes(m) == ql.quantized_bytes(_cls(cfg).from_linear(lin, cfg))
    m.load_from_float(lin.weight.detach(), lin.bias.detach())
    assert all(t.device.type == "cpu" for t in list(m.buffers()) + list(m.parameters()))
    ref = _cls(cfg).from_linear(lin, cfg)
    x = torch.randn(5, 70, dtype=torch.float16)
    assert torch.equal(m(x), ref(x))


@pytest.mark.parametrize("key", sorted(CFGS))
def test_state_dict_round_trip_and_dequantize(key):
    cfg = CFGS[key]
    lin = _linear(64, 20, True, 2)
    q = _cls(cfg).from_linear(lin, cfg)
    fresh = _cls(cfg)(64, 20, True, cfg, dtype=torch.float32)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))
    back = q.dequantize()
    assert isinstance(back, nn.Linear) and back.weight.dtype == torch.float32
    assert torch.equal(back.weight, q.dequantized_weight())
    assert torch.equal(back.bias, lin.bias.detach())


@pytest.mark.parametrize("key", ["nf4", "nf4-dq", "int8"])
@pytest.mark.parametrize("out_f,in_f", [(33, 70), (1, 1), (300, 257)])
def test_stored_bytes_equal_design_formulas(key, out_f, in_f):
    cfg = CFGS[key]
    m = ql.empty_quantized(in_f, out_f, False, cfg)
    n = out_f * in_f
    if cfg.method == "int8":
        expected = n + 4 * out_f
    else:
        nb = math.ceil(n / cfg.blocksize)
        stats = nb + 4 * math.ceil(nb / 256) + 1024 + 4 if cfg.double_quant else 4 * nb
        expected = math.ceil(n / 2) + stats + 64
        assert expected == ql.expected_4bit_bytes(n, cfg.blocksize, cfg.double_quant)
    assert ql.quantized_bytes(m) == expected
    with_bias = ql.empty_quantized(in_f, out_f, True, cfg, dtype=torch.bfloat16)
    assert ql.quantized_bytes(with_bias) == expected + 2 * out_f


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("block", nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)))
    model.add_module("norm", nn.LayerNorm(256))
    model.add_module("lm_head", nn.Linear(256, 100, bias=False))
    return model.half()


def test_quantize_model_honours_skips_and_footprint_shows_double_quant_saving():
    base = memory_footprint(_mlp())
    sizes = {}
    for key in ("nf4", "nf4-dq", "int8"):
        model = quantize_model(_mlp(), CFGS[key])
        assert isinstance(model.lm_head, nn.Linear) and type(model.lm_head) is nn.Linear  # default skip
        assert isinstance(model.block[0], (Linear4bit, Linear8bit))
        sizes[key] = memory_footprint(model)
    assert sizes["nf4-dq"] < sizes["nf4"] < sizes["int8"] < base
    nb = 2 * 256 * 512 // 64
    saved = (4 * nb) - (nb + 2 * (4 * math.ceil(nb / 2 / 256) + 1024 + 4))
    assert sizes["nf4"] - sizes["nf4-dq"] == saved
    model = quantize_model(_mlp(), QuantConfig(method="nf4", skip_modules=("block.2",)), skip=["norm"])
    assert isinstance(model.block[0], Linear4bit) and type(model.block[2]) is nn.Linear
    assert isinstance(model.lm_head, Linear4bit)  # the user's skip list replaces the default


def test_footprint_counts_shared_storage_once():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, lin)
    assert memory_footprint(model) == (64 + 8) * 4


def test_dequantize_model_restores_float_linears():
    model = quantize_model(_mlp(), CFGS["fp4"])
    x = torch.randn(4, 256, dtype=torch.float16)
    y = model(x)
    dequantize_model(model)
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in model.modules())
    assert rel_err(model(x), y) < 5e-3


def test_compute_dtype_is_used_and_output_keeps_input_dtype():
    cfg = QuantConfig(method="nf4", compute_dtype=torch.float32)
    q = Linear4bit.from_linear(_linear(64, 16, True, 3, torch.float16), cfg)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    out = q(x)
    assert out.dtype == torch.bfloat16
    ref = torch.ops.shardq.gemm_4bit(x.float(), q.weight, q.absmax, q.quant_map, 64, 16, 64, None, None, 0.0, q.bias)
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_bad_construction_errors():
    with pytest.raises(ValueError, match="needs a 4-bit QuantConfig"):
        Linear4bit(8, 8, cfg=QuantConfig(method="int8"))
    with pytest.raises(ValueError, match="needs an int8 QuantConfig"):
        Linear8bit(8, 8, cfg=QuantConfig(method="nf4"))
    m = ql.empty_quantized(8, 4, True, CFGS["nf4"])
    with pytest.raises(ValueError, match=r"weight has shape \(8, 4\), expected \(4, 8\)"):
        m.load_from_float(torch.randn(8, 4), torch.randn(4))
    with pytest.raises(ValueError, match="bias missing but the layer was built with one"):
        m.load_from_float(torch.randn(4, 8))
    with pytest.raises(ValueError, match="meta device"):
        m.load_from_float(torch.empty(4, 8, device="meta"), torch.randn(4))
    with pytest.raises(ValueError, match="float weight"):
        m.load_from_float(torch.ones(4, 8, dtype=torch.int32), torch.randn(4))
    with pytest.raises(RuntimeError, match="x has 9 features, layer takes 8"):
        ql.empty_quantized(8, 4, False, CFGS["nf4"], device="cpu")(torch.randn(2, 9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key", sorted(CFGS))
def test_cuda_layer_matches_cpu(key):
    cfg = CFGS[key]
    lin = _linear(128, 64, True, 4, torch.float16)
    q = _cls(cfg).from_linear(lin, cfg)
    x = torch.randn(3, 128, dtype=torch.float16)
    cpu = q(x)
    qg = _cls(cfg).from_linear(lin.cuda(), cfg)
    assert qg.weight.device.type == "cuda"
    assert rel_err(qg(x.cuda()).cpu(), cpu) < 2e-2


@pytest.mark.parametrize("key", sorted(CFGS))
def test_dtype_casts_keep_the_stored_formats(key):
    cfg = CFGS[key]
    q = _cls(cfg).from_linear(_linear(64, 8, True, 5), cfg)
    before = {n: b.clone() for n, b in q.named_buffers()}
    q.half()
    assert q.bias.dtype == torch.float16
    for n, b in q.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    q.to("cpu", torch.bfloat16)
    assert all(torch.equal(b, before[n]) for n, b in q.named_buffers())


_FIX = __import__("pathlib").Path(__file__).parent / "fixtures" / "bnb"


@pytest.mark.parametrize("suffix", [s for s in ("", "_cuda") if (_FIX / f"linear4bit{s}.safetensors").exists()])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16])
def test_linear4bit_matches_bitsandbytes_layer(suffix, qt, cd):
    from safetensors.torch import load_file

    f = load_file(_FIX / f"linear4bit{suffix}.safetensors")
    lin = nn.Linear(130, 40)
    with torch.no_grad():
        lin.weight.copy_(f["W"])
        lin.bias.copy_(f["bias"])
    q = Linear4bit.from_linear(lin, QuantConfig(method=qt, double_quant=True, compute_dtype=cd))
    out = q(f["x"])
    ref = f[f"out_{qt}_{str(cd).removeprefix('torch.')}"]
    assert out.dtype == ref.dtype == torch.float32
    # same stored weights; bitsandbytes' CUDA kernels accumulate in another order
    assert rel_err(out, ref) < (1e-6 if cd == torch.float32 and not suffix else 8e-3)


def test_quantize_model_refuses_meta_weights_before_changing_anything():
    model = _mlp()
    with torch.device("meta"):
        model.block[2] = nn.Linear(512, 256)
    with pytest.raises(ValueError, match="meta device .*'block.2'"):
        quantize_model(model, CFGS["nf4"])
    assert type(model.block[0]) is nn.Linear  # nothing was replaced
