"""transformers 5 checkpoint conversions on the CPU: GPT-NeoX (renamed head), Mixtral and Qwen2-MoE (per-expert
tensors fused into experts.gate_up_proj/down_proj) saved in the old layout by save_pretrained, loaded with CPU and
disk offload against the reference model, quantized (expert stacks included) against quantize_model, and broken
groups refused."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from _f_models import rewrite_checkpoint  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import shardq  # noqa: E402
from shardq.checkpoint.index import index_checkpoint  # noqa: E402
from shardq.checkpoint.conversions import convert_source  # noqa: E402
from shardq.hf import meta_model_from_dir  # noqa: E402
from shardq.hf import no_split_modules  # noqa: E402
from shardq.loading.loader import LoadError  # noqa: E402
from shardq.loading.loader import Route  # noqa: E402
from shardq.loading.loader import _pinned_ok  # noqa: E402
from shardq.loading.loader import checkpoint_source  # noqa: E402
from shardq.loading.loader import load_sharded  # noqa: E402
from shardq.planning.planner import decompose  # noqa: E402
from shardq.quant.convert import quantize_model  # noqa: E402

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)
MOE = ("mixtral", "qwen2_moe")


def tiny(arch: str):
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**COMMON)
    if arch == "mixtral":
        return transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    return transformers.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=64, **COMMON)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (reference model, sharded checkpoint dir in the old, per-expert layout)."""
    out = {}
    for arch in ("gpt_neox", "mixtral", "qwen2_moe"):
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(tiny(arch)).eval()
        d = tmp_path_factory.mktemp(arch)
        ref.save_pretrained(d, max_shard_size="60KB")
        assert (d / "model.safetensors.index.json").exists()
        out[arch] = (ref, d)
    return out


def offload_map(model: torch.nn.Module) -> dict:
    """Every other block on disk, the rest on the CPU."""
    units = decompose(model, set(no_split_modules(model)))
    return {u: ("disk" if i % 2 else "cpu") for i, u in enumerate(units)}


def load(ckpt, tmp_path, **kw):
    model = meta_model_from_dir(ckpt)
    return load_sharded(model, ckpt, max_memory={"cpu": "1GB", "disk": "1GB"}, device_map=offload_map(model),
                        offload_dir=tmp_path / "off", progress=False, **kw)


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_checkpoints_use_the_old_names(saved):
    assert "embed_out.weight" in index_checkpoint(saved["gpt_neox"][1]).tensors
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in index_checkpoint(saved["mixtral"][1]).tensors
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in index_checkpoint(saved["qwen2_moe"][1]).tensors


@pytest.mark.parametrize("arch", ["gpt_neox", "mixtral", "qwen2_moe"])
def test_fp32_cpu_and_disk_offload_matches_reference(saved, arch, tmp_path):
    ref, ckpt = saved[arch]
    model = load(ckpt, tmp_path)
    assert "disk" in model.shardq_plan.device_map.values()
    assert any(f.suffix == ".safetensors" for f in (tmp_path / "off").iterdir())
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(IDS), pad_token_id=0)
    torch.testing.assert_close(model.generate(IDS, **kw), ref.generate(IDS, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_matches_quantize_model_and_experts_are_quantized(saved, arch, method, tmp_path):
    ref, ckpt = saved[arch]
    model = load(ckpt, tmp_path, quant=method)
    want = quantize_model(copy.deepcopy(ref), method)
    torch.testing.assert_close(logits(model), logits(want), rtol=1e-4, atol=1e-4)
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts") and hasattr(m, "has_gate")]
    assert len(experts) == 2
    for m in experts:  # fused tensors: quantized stacks, no float 3-D parameter left
        assert [p for p in m._parameters.values() if p is not None and p.dim() == 3] == []
        assert {type(m._modules[a]).__name__ for a in ("gate_up_proj", "down_proj")} == {"QuantizedExperts"}
        assert m.config._experts_implementation == "shardq"
    assert any(type(m).__name__ == ("Linear8bit" if method == "int8" else "Linear4bit") for m in model.modules())
    assert not any("fused MoE expert" in w for w in model.shardq_plan.warnings)


@pytest.mark.parametrize("arch", ["gpt_neox", "mixtral"])
def test_plan_of_the_directory_reports_no_mismatch(saved, arch):
    p = shardq.plan(saved[arch][1], quant="nf4", max_memory={"cpu": "1GB"})
    assert p.mismatches == []
    assert not any("fused MoE expert" in w for w in p.warnings)  # the stacks are quantized now


def test_composites_are_read_lazily_into_transformers_layout(saved):
    ref, ckpt = saved["mixtral"]
    reads: list[str] = []
    src = {k: s.__class__(s.name, s.shape, s.dtype, s.nbytes, (lambda s=s: reads.append(s.name) or s.read()),
                          s.order, s.info) for k, s in checkpoint_source(index_checkpoint(ckpt)).items()}
    out = convert_source(meta_model_from_dir(ckpt), src)
    assert reads == []
    fused = out["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused.shape == (4, 256, 64) and fused.info is None and fused.nbytes == 4 * 256 * 64 * 4
    assert fused.name == ("model.layers.1.block_sparse_moe.experts.*.w1.weight + "
                          "model.layers.1.block_sparse_moe.experts.*.w3.weight")
    assert not _pinned_ok(fused, Route(torch.device("cuda", 0), torch.float32))  # no single file range
    assert out["model.layers.0.mlp.gate.weight"].info is not None  # renamed: same lazy reader
    torch.testing.assert_close(fused.read(), ref.model.layers[1].mlp.experts.gate_up_proj.detach(), rtol=0, atol=0)
    assert len(reads) == 8 and all(".w1." in r or ".w3." in r for r in reads)
    down = out["model.layers.0.mlp.experts.down_proj"]  # MergeModulelist alone
    torch.testing.assert_close(down.read(), ref.model.layers[0].mlp.experts.down_proj.detach(), rtol=0, atol=0)


def test_non_transformers_model_gets_no_conversion(saved):
    src = checkpoint_source(index_checkpoint(saved["gpt_neox"][1]))
    assert convert_source(torch.nn.Linear(2, 2), src) == src


def _snapshot(model):
    return ([(type(m), id(m)) for m in model.modules()],
            {k: (id(t), t.device, t.dtype, tuple(t.shape)) for k, t in model.state_dict(keep_vars=True).items()})


BROKEN = {
    "missing": ("model.layers.1.block_sparse_moe.experts.2.w3.weight", None,
                "model.layers.1.block_sparse_moe.experts.2.w3.weight: missing"),
    "last_expert": ("model.layers.0.block_sparse_moe.experts.3.w2.weight", None,
                    "model.layers.0.block_sparse_moe.experts.3.w2.weight: missing"),
    "shape": ("model.layers.0.block_sparse_moe.experts.1.w1.weight", (127, 64),
              "model.layers.0.block_sparse_moe.experts.1.w1.weight [127, 64]; the other parts have [128, 64]"),
}


@pytest.mark.parametrize("problem", sorted(BROKEN))
def test_broken_expert_group_fails_before_anything_is_placed(saved, tmp_path, problem):
    ref, ckpt = saved["mixtral"]
    key, shape, expected = BROKEN[problem]

    def edit(t):
        if shape is None:
            del t[key]
        else:
            t[key] = torch.randn(shape)

    bad = rewrite_checkpoint(ckpt, tmp_path / "bad", edit)
    for model in (meta_model_from_dir(bad), copy.deepcopy(ref)):
        before = _snapshot(model)
        with pytest.raises(LoadError) as e:
            load_sharded(model, bad, max_memory={"cpu": "1GB"}, progress=False)
        assert expected in str(e.value) and "Nothing was loaded" in str(e.value)
        assert _snapshot(model) == before and not hasattr(model, "shardq_plan")
    assert any(key in m for m in shardq.plan(bad, max_memory={"cpu": "1GB"}).mismatches)  # reported, not raised


def test_renamed_tensor_with_wrong_shape_is_reported_by_both_names(saved, tmp_path):
    _, ckpt = saved["gpt_neox"]

    def edit(t):
        t["embed_out.weight"] = torch.randn(VOCAB + 1, 64)

    bad = rewrite_checkpoint(ckpt, tmp_path / "bad", edit)
    with pytest.raises(LoadError, match=r"lm_head\.weight \(checkpoint embed_out\.weight\): checkpoint \[129, 64\]"):
        load_sharded(meta_model_from_dir(bad), bad, max_memory={"cpu": "1GB"}, progress=False)


def test_unknown_operation_is_refused_by_name(saved, monkeypatch):
    import transformers.conversion_mapping as cm
    from transformers.core_model_loading import MergeModulelist, Transpose, WeightConverter

    real = cm.get_model_conversion_mapping
    odd = WeightConverter(".experts.*.w2.weight", ".experts.down_proj",
                          operations=[MergeModulelist(0), Transpose(1, 2)])
    monkeypatch.setattr(cm, "get_model_conversion_mapping",
                        lambda m: [odd if ".experts.*.w2.weight" in getattr(t, "source_patterns", []) else t
                                   for t in real(m)])
    _, ckpt = saved["mixtral"]
    model = meta_model_from_dir(ckpt)
    before = _snapshot(model)
    with pytest.raises(LoadError, match=r"down_proj: transformers' conversion .*w2.* uses the operation Transpose"):
        load_sharded(model, ckpt, max_memory={"cpu": "1GB"}, progress=False)
    assert _snapshot(model) == before


def test_converted_source_keeps_the_checkpoint_order(saved):
    _, ckpt = saved["mixtral"]
    src = checkpoint_source(index_checkpoint(ckpt))
    out = convert_source(meta_model_from_dir(ckpt), src)
    assert len(out) == len(src) - 2 * 12 + 2 * 2  # per layer: 4 experts x (w1, w2, w3) → gate_up_proj, down_proj
    assert [k for k in out if k in src] == [k for k in src if k in out]
