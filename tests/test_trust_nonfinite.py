"""NaN/Inf in a checkpoint's float weights: found as the tensors stream in, named, a warning by default, an error
(the load rolled back) on request; bad values of the option refused before anything is read; QuantConfig fields
checked for type before any planning."""

from __future__ import annotations

import warnings

import pytest
import torch
from _f_models import save_checkpoint
from safetensors.torch import load_file, save_file

from shardq import meta_model_from_dir
from shardq.config import QuantConfig, QuantConfigError
from shardq.loading.loader import LoadError, load_sharded

POISON = {"model.layers.0.mlp.up_proj.weight": float("nan"), "model.layers.1.self_attn.q_proj.weight": float("inf")}


def _poisoned(tmp_path, poison=POISON):
    ckpt = save_checkpoint("llama", tmp_path / "ck", dtype=torch.float32, layers=2)
    f = next(ckpt.glob("*.safetensors"))
    tensors = load_file(f)
    for name, value in poison.items():
        tensors[name][0, 3] = value
    save_file(tensors, f, metadata={"format": "pt"})
    return ckpt


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_nonfinite_weights_are_named_in_a_warning(tmp_path, quant):
    ckpt = _poisoned(tmp_path)
    with pytest.warns(RuntimeWarning, match="2 checkpoint tensor") as rec:
        load_sharded(meta_model_from_dir(ckpt), ckpt, quant=quant, max_memory={"cpu": "1GB"}, progress=False)
    text = str(rec[0].message)
    assert all(name in text for name in POISON)
    assert ("whole block" in text) == (quant == "nf4")


def test_nonfinite_error_rolls_the_load_back(tmp_path):
    ckpt = _poisoned(tmp_path, {"model.layers.1.mlp.down_proj.weight": float("-inf")})
    model = meta_model_from_dir(ckpt)
    with pytest.raises(LoadError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*rolled back"):
        load_sharded(model, ckpt, quant="nf4", max_memory={"cpu": "1GB"}, progress=False, nonfinite="error")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_finite_checkpoint_and_ignore_give_no_warning(tmp_path):
    clean = save_checkpoint("llama", tmp_path / "clean", dtype=torch.float32, layers=2)
    bad = _poisoned(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        load_sharded(meta_model_from_dir(clean), clean, quant="int8", max_memory={"cpu": "1GB"}, progress=False)
        load_sharded(meta_model_from_dir(bad), bad, max_memory={"cpu": "1GB"}, progress=False, nonfinite="ignore")


def test_bad_nonfinite_option_is_refused_before_reading(tmp_path):
    ckpt = save_checkpoint("llama", tmp_path / "ck", dtype=torch.float32, layers=2)
    model = meta_model_from_dir(ckpt)
    with pytest.raises(LoadError, match="nonfinite='raise' is not one of"):
        load_sharded(model, ckpt, max_memory={"cpu": "1GB"}, progress=False, nonfinite="raise")
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(method="nf4", blocksize=64.0), "blocksize"),
        (dict(method="nf4", double_quant="yes"), "double_quant"),
        (dict(method="int8", fp32_cpu_offload=1), "fp32_cpu_offload"),
        (dict(method="int8", skip_modules="lm_head"), "skip_modules"),
        (dict(method="nf4", compute_dtype="float16"), "compute_dtype"),
        (dict(method=["nf4"]), "method"),
    ],
)
def test_quant_config_fields_checked_for_type(kw, field):
    with pytest.raises(QuantConfigError, match=field):
        QuantConfig(**kw)
    assert QuantConfig(method="nf4", blocksize=128, skip_modules=["lm_head"]).skip_modules == ("lm_head",)
