"""Checkpoints in the transformers + bitsandbytes safetensors layout: bnb-made checkpoints load in shardq and give
bitsandbytes' outputs; shardq's checkpoints reload without re-quantizing (and load in bitsandbytes when it is
installed); malformed files fail naming the tensor, before the model is touched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from shardq.checkpoint.index import CheckpointError
from shardq.config import QuantConfig
from shardq.quant.linear import Linear4bit, Linear8bit
from shardq.quant.convert import quantize_model
from shardq.quant.serialize import bnb_state_dict, checkpoint_config, load_quantized, save_quantized
from _f_numerics import rel_err

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
FIX = Path(__file__).parent / "fixtures" / "bnb"
BNB_CKPTS = ["tiny_llama_nf4_dq", "tiny_opt_fp4", "tiny_opt_int8"]
# checkpoints made by bitsandbytes' CPU backend, and by its CUDA kernels where those fixtures were made
MADE_BY = [(n, s) for s in ("", "_cuda") for n in BNB_CKPTS if (FIX / f"{n}{s}").is_dir()]



def _float_model(ckpt: Path) -> nn.Module:
    cfg = transformers.AutoConfig.from_pretrained(ckpt)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,suffix", MADE_BY)
def test_bitsandbytes_checkpoints_load_and_match_bitsandbytes_logits(name, suffix):
    io = load_file(FIX / f"tiny_io{suffix}.safetensors")
    model = load_quantized(_float_model(FIX / f"{name}{suffix}"), FIX / f"{name}{suffix}")
    kinds = {type(m) for m in model.modules()}
    assert (Linear8bit if "int8" in name else Linear4bit) in kinds
    assert type(model.lm_head) is nn.Linear  # bitsandbytes keeps the head in full precision
    with torch.no_grad():
        logits = model(io["input_ids"]).logits.float()
    ref = io[f"logits_{name}"]
    # 4-bit: the same dequantized weights and fp32 matmuls (on CUDA in another summation order);
    # int8: bitsandbytes rounds activations in fp16 and its own way
    assert rel_err(logits, ref) < (1e-2 if "int8" in name else 1e-4 if suffix else 1e-5)


@pytest.mark.parametrize("name,suffix", MADE_BY)
def test_shardq_checkpoint_has_the_bitsandbytes_layout(name, suffix, tmp_path):
    name = name + suffix
    bnb_model = load_quantized(_float_model(FIX / name), FIX / name)
    out = save_quantized(bnb_model, tmp_path / "re")
    with safe_open(str(FIX / name / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            if "absmax" in k and ta.dtype != tb.dtype:
                continue  # bitsandbytes' CPU backend may save plain absmax as bf16; shardq keeps fp32
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, k
            if "quant_state" in k:
                assert json.loads(bytes(ta.tolist())) == json.loads(bytes(tb.tolist())), k
            else:
                assert torch.equal(ta, tb), k
    qa = json.loads((FIX / name / "config.json").read_text())["quantization_config"]
    qb = json.loads((out / "config.json").read_text())["quantization_config"]
    for key in ("load_in_4bit", "load_in_8bit", "bnb_4bit_use_double_quant", "llm_int8_threshold", "quant_method"):
        assert qa[key] == qb[key], key
    if qa["load_in_4bit"]:
        assert qa["bnb_4bit_quant_type"] == qb["bnb_4bit_quant_type"]


@pytest.mark.parametrize("cfg", [QuantConfig(method="nf4", double_quant=True), QuantConfig(method="fp4", blocksize=32),
                                 QuantConfig(method="int8", threshold=4.0)], ids=["nf4dq", "fp4", "int8"])
def test_save_and_reload_without_requantizing(cfg, tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 70), nn.ReLU(), nn.Linear(70, 30, bias=False), nn.Linear(30, 5))
    quantize_model(model, cfg, skip=["3"])
    x = torch.randn(4, 40)
    y = model(x)
    save_quantized(model, tmp_path)
    assert checkpoint_config(tmp_path).method == cfg.method
    torch.manual_seed(2)
    fresh = nn.Sequential(nn.Linear(40, 70), nn.ReLU(), nn.Linear(70, 30, bias=False), nn.Linear(30, 5))
    load_quantized(fresh, tmp_path)
    assert type(fresh[3]) is nn.Linear and torch.equal(fresh[3].weight, model[3].weight)
    assert torch.equal(fresh(x), y)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_sharded_save_reloads_and_indexes_every_tensor(method, tmp_path):
    torch.manual_seed(3)
    model = quantize_model(nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 48)),
                           QuantConfig(method=method, double_quant=method == "nf4"))
    save_quantized(model, tmp_path, max_shard_size="6KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    state = bnb_state_dict(model)
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    for f in files:  # at most the limit, unless one tensor alone is larger
        held = [state[k] for k, v in index["weight_map"].items() if v == f]
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held) <= 6000
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    fresh = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 48))
    load_quantized(fresh, tmp_path)
    x = torch.randn(5, 96)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="unit"):
        save_quantized(model, tmp_path / "bad", max_shard_size="12 parsecs")


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_shardq_checkpoints_load_in_bitsandbytes(method, tmp_path):
    pytest.importorskip("bitsandbytes")
    src = FIX / "tiny_opt_fp4"
    model = quantize_model(_float_model(src), QuantConfig(method=method, double_quant=method == "nf4"))
    if method == "int8":
        model = model.half()
    save_quantized(model, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    for m in theirs.modules():  # bitsandbytes' plain CPU path (no AVX512-BF16 repacking)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        a, b = model(ids).logits.float(), theirs(ids).logits.float()
    assert rel_err(a, b) < (1e-2 if method == "int8" else 1e-5)


# ---------------- malformed checkpoints ----------------

def _copy(tmp_path: Path, name: str = "tiny_llama_nf4_dq") -> Path:
    dst = tmp_path / name
    shutil.copytree(FIX / name, dst)
    return dst


def _rewrite(ckpt: Path, edit) -> None:
    f = ckpt / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata=meta)


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop(f"{Q}.weight.absmax"), f"tensor '{Q}.weight.absmax' is missing"),
    (lambda t: t.pop("model.norm.weight"), "tensor 'model.norm.weight' is missing"),
    (lambda t: t.__setitem__(f"{Q}.weight", t[f"{Q}.weight"][:-2]), f"tensor '{Q}.weight' is uint8 \\[2046, 1\\]"),
    (lambda t: t.__setitem__(f"{Q}.weight.nested_absmax", t[f"{Q}.weight.nested_absmax"].half()),
     f"tensor '{Q}.weight.nested_absmax' is float16"),
    (lambda t: t.__setitem__("model.norm.weight", torch.ones(65)), "tensor 'model.norm.weight' has shape \\[65\\]"),
    (lambda t: t.__setitem__(f"{Q}.weight.quant_state.bitsandbytes__nf4", torch.tensor([123, 34], dtype=torch.uint8)),
     "is not the packed JSON"),
    (lambda t: t.__setitem__(f"{Q}.weight.quant_map", torch.linspace(-1, 1, 16)), "neither NF4 nor FP4"),
])
def test_bad_tensors_name_the_tensor_and_leave_the_model_untouched(tmp_path, edit, match):
    ckpt = _copy(tmp_path)
    _rewrite(ckpt, edit)
    model = _float_model(ckpt)
    before = _snapshot(model)
    with pytest.raises((CheckpointError, ValueError), match=match):
        load_quantized(model, ckpt)
    if "NF4" not in match:  # code-book checks run while building layers, still before any layer is swapped in
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in model.modules())


def test_quant_state_shape_of_another_model(tmp_path):
    ckpt = _copy(tmp_path)

    def edit(t):
        k = f"{Q}.weight.quant_state.bitsandbytes__nf4"
        d = json.loads(bytes(t[k].tolist()))
        d["shape"] = [32, 128]
        t[k] = torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)

    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match="belongs to another model"):
        load_quantized(_float_model(ckpt), ckpt)


def test_truncated_file_is_refused(tmp_path):
    ckpt = _copy(tmp_path)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(_float_model(ckpt), ckpt)


def test_checkpoint_without_quantization_config_is_refused(tmp_path):
    ckpt = _copy(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not say how it was quantized"):
        checkpoint_config(ckpt)


def test_pickle_files_are_never_read(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    with pytest.raises(CheckpointError, match="never pickle"):
        load_quantized(nn.Linear(2, 2), tmp_path)


def test_saving_an_unquantized_model_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(nn.Linear(4, 4), tmp_path)
