"""transformers glue and plans of checkpoint directories read by header (config.json + safetensors)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _f_models import ARCHS, meta_model, save_checkpoint, tiny_config
from _f_plan_checks import check_plan
from shardq.checkpoint import index as checkpoint
from shardq import hf
from shardq.config import QuantConfig, to_bnb_dict
from shardq.planning.planner import PlanError, check_checkpoint, plan, plan_model

CAPS = {0: "2MB", "cpu": "4MB", "disk": "1GB"}
WL = (1, 16)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {a: save_checkpoint(a, root / a, shards=1 if a in ("opt", "gpt2") else 2, hidden=64, layers=3, vocab=300)
            for a in ARCHS}


# ---------------------------------------------------------------- hf glue

@pytest.mark.parametrize("arch,cls,blocks", [
    ("llama", "LlamaForCausalLM", ["LlamaDecoderLayer"]), ("opt", "OPTForCausalLM", ["OPTDecoderLayer"]),
    ("bloom", "BloomForCausalLM", ["BloomBlock"]), ("t5", "T5ForConditionalGeneration", ["T5Block"]),
    ("gpt2", "GPT2LMHeadModel", ["GPT2Block"]),
])
def test_meta_model_from_dir(ckpts, arch, cls, blocks):
    m = hf.meta_model_from_dir(ckpts[arch])
    assert type(m).__name__ == cls
    assert all(p.is_meta for p in m.parameters())
    assert {p.dtype for p in m.parameters()} == {torch.float16}  # the config's dtype
    assert hf.no_split_modules(m) == blocks
    assert hf.meta_model_from_dir(ckpts[arch], torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_auto_class_without_architectures(tmp_path):
    for arch, expected in (("t5", "T5ForConditionalGeneration"), ("llama", "LlamaForCausalLM")):
        d = tmp_path / arch
        tiny_config(arch).save_pretrained(d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("architectures", None)
        (d / "config.json").write_text(json.dumps(cfg))
        assert type(hf.meta_model_from_dir(d)).__name__ == expected
    cfg = tiny_config("llama")
    cfg.architectures = ["NoSuchModelForCausalLM"]
    assert hf.model_class(cfg).__name__ == "LlamaForCausalLM"


def test_tied_groups(ckpts):
    bloom = hf.meta_model_from_dir(ckpts["bloom"])
    assert hf.tied_parameter_groups(bloom) == [["lm_head.weight", "transformer.word_embeddings.weight"]]
    t5 = hf.meta_model_from_dir(ckpts["t5"])
    assert hf.tied_parameter_groups(t5) == [["decoder.embed_tokens.weight", "encoder.embed_tokens.weight",
                                             "lm_head.weight", "shared.weight"]]
    llama = meta_model("llama", tie=False)
    assert hf.tied_parameter_groups(llama) == []
    assert hf.tied_parameter_groups(meta_model("llama", tie=True)) == [["lm_head.weight", "model.embed_tokens.weight"]]


def test_repeated_blocks_detected_without_declaration():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
            self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])  # no tensors: not a block
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.LayerNorm(2)])

    assert hf.no_split_modules(Net()) == ["Sequential"]


@pytest.mark.parametrize("content,match", [
    (None, "config.json does not exist"), ("{oops", "not valid JSON"), ('{"hidden_size": 4}', "no 'model_type'"),
    ('{"model_type": "no-such-arch"}', "cannot read model_type"),
])
def test_load_config_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(hf.ModelConfigError, match=match):
        hf.load_config(tmp_path)


# ---------------------------------------------------------------- plans of checkpoint directories

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["int8", "nf4", None])
def test_plan_checkpoint_matches_model_plan(ckpts, arch, quant):
    p = plan(ckpts[arch], quant, max_memory=CAPS, gpus="1x1GB", workload=WL)
    model = hf.meta_model_from_dir(ckpts[arch])
    assert p.mismatches == [] and p.source == str(ckpts[arch]) and p.dtype == "float16"
    check_plan(model, p)
    direct = plan_model(model, quant, max_memory=CAPS, gpus="1x1GB", workload=WL)
    assert p.device_map == direct.device_map and p.totals == direct.totals


def test_plan_reads_headers_only(ckpts, monkeypatch, checkpoint_reads):
    reads = checkpoint_reads
    monkeypatch.setattr(checkpoint, "read_tensor", lambda *a, **k: pytest.fail("plan must not read tensors"))
    p = plan(ckpts["llama"], "nf4", max_memory=CAPS, gpus="1x1GB", workload=WL)
    data_bytes = checkpoint.index_checkpoint(ckpts["llama"]).total_bytes
    assert sum(reads) < data_bytes / 20 and p.totals[0] > 0


def test_mismatches_are_reported(ckpts, tmp_path):
    src = ckpts["opt"]
    d = tmp_path / "opt"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    state.pop("model.decoder.layers.0.fc1.weight")
    state["model.decoder.layers.1.fc2.weight"] = torch.zeros(3, 3, dtype=torch.float16)
    state["stray.weight"] = torch.zeros(2, dtype=torch.float16)
    state["model.decoder.layers.0.fc2.SCB"] = torch.zeros(64)  # bitsandbytes statistics are expected extras
    save_file(state, d / "model.safetensors")
    p = plan(d, None, max_memory=CAPS, gpus="1x1GB", workload=WL)
    text = " | ".join(p.mismatches)
    assert "1 tensor(s) missing from the checkpoint: model.decoder.layers.0.fc1.weight" in text
    assert "1 tensor(s) not in the model: stray.weight" in text
    assert "model.decoder.layers.1.fc2.weight: checkpoint [3, 3] vs model [64, 256]" in text
    assert "SCB" not in text


def test_base_model_checkpoint_prefix(ckpts):
    """A checkpoint saved from the base model (keys without 'transformer.') matches as transformers loads it."""
    model = hf.meta_model_from_dir(ckpts["bloom"])
    index = checkpoint.index_checkpoint(ckpts["bloom"])
    stripped = {k.removeprefix("transformer."): v for k, v in index.tensors.items() if k.startswith("transformer.")}
    assert check_checkpoint(model, stripped) == []


def test_quantization_config_in_checkpoint_is_used(ckpts, tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    cfg = json.loads((ckpts["opt"] / "config.json").read_text())
    cfg["quantization_config"] = to_bnb_dict(QuantConfig(method="nf4", double_quant=True))
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").symlink_to(ckpts["opt"] / "model.safetensors")
    p = plan(d, max_memory=CAPS, gpus="1x1GB", workload=WL)
    assert p.quant.method == "nf4" and p.quant.double_quant
    assert plan(d, "int8", max_memory=CAPS, gpus="1x1GB", workload=WL).quant.method == "int8"


def test_dtype_override_and_errors(ckpts, tmp_path):
    half = plan(ckpts["llama"], None, max_memory=CAPS, gpus="1x1GB", workload=WL)
    full = plan(ckpts["llama"], None, dtype="float32", max_memory={0: "4MB"}, gpus="1x1GB", workload=WL)
    assert full.totals[0] == 2 * half.totals[0] - _fp32_buffers(ckpts["llama"])
    with pytest.raises(PlanError, match="not a floating dtype"):
        plan(ckpts["llama"], None, dtype="int8", gpus="1x1GB")
    with pytest.raises(PlanError, match="nn.Module or a checkpoint directory"):
        plan(42)
    (tmp_path / "config.json").write_text((ckpts["llama"] / "config.json").read_text())
    with pytest.raises(checkpoint.CheckpointError, match="no safetensors"):
        plan(tmp_path, gpus="1x1GB")


def _fp32_buffers(path) -> int:
    """Bytes of the fp32 buffers (rotary inv_freq) that stay fp32 whatever the weights' dtype."""
    m = hf.meta_model_from_dir(path)
    return sum(b.numel() * 4 for b in m.buffers() if b.dtype == torch.float32)


@pytest.mark.parametrize("quant", [QuantConfig(method="int8"), QuantConfig(method="nf4", double_quant=True),
                                   QuantConfig(method="fp4")])
def test_prequantized_checkpoint_plans_its_stored_bytes(tmp_path, quant):
    """A checkpoint written by shardq.save_quantized (bitsandbytes layout): the plan takes the config's
    quantization, reports no mismatches, and its bytes equal the quantized tensors actually stored."""
    from _f_models import model_class
    from shardq.quant.convert import quantize_model
    from shardq.quant.serialize import save_quantized

    torch.manual_seed(0)
    cfg = tiny_config("llama", hidden=64, layers=2, vocab=256)
    cfg.architectures = ["LlamaForCausalLM"]
    model = quantize_model(model_class("llama")(cfg).to(torch.float16), quant)
    save_quantized(model, tmp_path, quant)
    p = plan(tmp_path, max_memory=CAPS, gpus="1x1GB", workload=WL)
    assert p.quant.method == quant.method and p.quant.double_quant == quant.double_quant
    assert p.mismatches == []
    index = checkpoint.index_checkpoint(tmp_path)
    stored = sum(t.nbytes for t in index if ".quant_state." not in t.name and not t.name.endswith(".weight_format"))
    buffers = sum(b.numel() * b.element_size() for n, b in hf.meta_model_from_dir(tmp_path).named_buffers())
    offsets = 4 * sum(1 for t in index if t.name.endswith(".nested_absmax"))  # in the quant_state JSON on disk
    assert p.totals[0] == stored + buffers + offsets


def test_plan_from_python_takes_dtype_aliases(tmp_path):
    from _f_models import save_checkpoint

    import shardq

    ckpt = save_checkpoint("llama", tmp_path / "ck", dtype=torch.float32, layers=2)
    for alias, want in (("fp16", "float16"), ("bf16", "bfloat16"), ("torch.float32", "float32")):
        assert shardq.plan(ckpt, "nf4", dtype=alias, max_memory={"cpu": "1GB"}).dtype == want
    with pytest.raises(shardq.planning.placement.PlanError, match="not a floating dtype"):
        shardq.plan(ckpt, "nf4", dtype="int8", max_memory={"cpu": "1GB"})
