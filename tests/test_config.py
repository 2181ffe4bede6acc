"""QuantConfig: every BitsAndBytesConfig field maps, and contradictory settings are refused by name."""

import pytest
import torch

from shardq.config import QuantConfig, QuantConfigError, from_bnb_dict, to_bnb_dict

transformers = pytest.importorskip("transformers")
BitsAndBytesConfig = transformers.BitsAndBytesConfig


def test_bnb_4bit_config_maps_every_field():
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head", "score"])
    cfg = QuantConfig.from_any(bnb)
    assert cfg == QuantConfig(method="nf4", double_quant=True, compute_dtype=torch.bfloat16,
                              skip_modules=("lm_head", "score"))
    assert QuantConfig.from_any(bnb.to_dict()) == cfg


def test_bnb_8bit_config_maps_threshold_and_offload():
    bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.5, llm_int8_enable_fp32_cpu_offload=True)
    cfg = QuantConfig.from_any(bnb)
    assert (cfg.method, cfg.threshold, cfg.fp32_cpu_offload, cfg.double_quant) == ("int8", 4.5, True, False)
    assert cfg.skips("lm_head") and not cfg.skips("model.layers.0.mlp.up_proj")


def test_bnb_default_4bit_is_fp4_like_transformers():
    assert QuantConfig.from_any(BitsAndBytesConfig(load_in_4bit=True)).method == "fp4"


def test_round_trip_through_bnb_dict():
    for cfg in [QuantConfig("int8", threshold=0.0), QuantConfig("nf4", double_quant=True, compute_dtype=torch.float16),
                QuantConfig("fp4", skip_modules=("head",))]:
        assert from_bnb_dict(to_bnb_dict(cfg)).replace(compute_dtype=cfg.compute_dtype) == cfg


@pytest.mark.parametrize("name,method", [("int8", "int8"), ("8bit", "int8"), ("NF4", "nf4"), ("fp4", "fp4"),
                                         (None, "none"), ("none", "none")])
def test_names(name, method):
    assert QuantConfig.from_any(name).method == method


@pytest.mark.parametrize("kwargs,field", [
    (dict(method="int4"), "method"),
    (dict(method="int8", threshold=-1.0), "threshold"),
    (dict(method="int8", threshold=float("nan")), "threshold"),
    (dict(method="nf4", blocksize=100), "blocksize"),
    (dict(method="int8", double_quant=True), "double_quant"),
    (dict(method="nf4", compute_dtype=torch.int8), "compute_dtype"),
])
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(QuantConfigError, match=field):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("d,field", [
    (dict(load_in_8bit=True, load_in_4bit=True), "load_in_8bit and load_in_4bit"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type"),
    (dict(load_in_8bit=True, llm_int8_has_fp16_weight=True), "llm_int8_has_fp16_weight"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype="int3"), "bnb_4bit_compute_dtype"),
    (dict(load_in_4bit=True, bnb_4bit_quant_storage="float16"), "bnb_4bit_quant_storage"),
    (dict(quant_method="gptq", bits=4), "gptq"),
])
def test_contradictory_bnb_dicts(d, field):
    with pytest.raises(QuantConfigError, match=field):
        QuantConfig.from_any(d)


def test_unknown_input_types_and_fields():
    with pytest.raises(QuantConfigError, match="unknown quantization field"):
        QuantConfig.from_any({"method": "nf4", "bits": 3})
    with pytest.raises(QuantConfigError, match="cannot read"):
        QuantConfig.from_any(4)
