"""Fused MoE expert stacks quantized per expert (shardq.quant.experts) on the CPU: tiny Mixtral, Qwen2-MoE and
Qwen3-MoE quantized in memory and on load (old per-expert checkpoint layout, CPU + disk offload), sized exactly by
the planner, skipped by name, refused by save_quantized."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import shardq  # noqa: E402
from _f_plan_checks import check_plan  # noqa: E402
from shardq.config import QuantConfig  # noqa: E402
from shardq.hf import meta_model_from_dir  # noqa: E402
from shardq.hf import no_split_modules  # noqa: E402
from shardq.loading.loader import load_sharded  # noqa: E402
from shardq.planning.planner import decompose  # noqa: E402
from shardq.planning.planner import plan_model  # noqa: E402
from shardq.quant.experts import QuantizedExperts  # noqa: E402
from shardq.quant.linear import Linear4bit  # noqa: E402
from shardq.quant.linear import Linear8bit  # noqa: E402
from shardq.quant.convert import dequantize_model  # noqa: E402
from shardq.quant.linear import memory_footprint  # noqa: E402
from shardq.quant.convert import quantize_model  # noqa: E402

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
METHODS = ("int8", "nf4")
BOUND = {"int8": 0.08, "nf4": 0.3}  # relative logit error vs fp32, as tests/test_loader.py bounds it
NOT_EXPERTS = ["self_attn", "lm_head", "shared_expert", "shared_expert_gate"]  # every nn.Linear of these models
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def tiny(arch: str) -> transformers.PretrainedConfig:
    if arch == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **COMMON)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=64, **COMMON)
    return transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **COMMON)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """arch -> (fp32 reference model, checkpoint dir saved in the old per-expert layout)."""
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(tiny(arch)).eval()
        d = tmp_path_factory.mktemp(arch)
        ref.save_pretrained(d, max_shard_size="60KB")
        out[arch] = (ref, d)
    return out


def logits(model: nn.Module) -> torch.Tensor:
    """Logits for IDS, computed where the model's parameters live (a dispatched model moves inputs itself)."""
    dev = next(p.device for p in model.parameters() if p.device.type != "meta")
    with torch.no_grad():
        return model(input_ids=IDS.to(dev)).logits


def rel_error(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out - want).norm() / want.norm()).item()


def stacks(model: nn.Module) -> dict[str, QuantizedExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}


def eager(model: nn.Module) -> nn.Module:
    model.set_experts_implementation("eager")
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_quantize_model_quantizes_every_stack_and_only_rounds_weights(refs, arch, method):
    ref, _ = refs[arch]
    q = quantize_model(copy.deepcopy(ref), method)
    found = stacks(q)
    assert len(found) == 2 * ref.config.num_hidden_layers  # gate_up_proj and down_proj of every layer
    for name, s in found.items():
        experts = q.get_submodule(name.rpartition(".")[0])
        assert experts.config._experts_implementation == "shardq" and ref.config._experts_implementation != "shardq"
        assert not any(p.dim() == 3 for p in experts.parameters(recurse=False))
    assert 0 < rel_error(logits(q), logits(ref)) < BOUND[method]
    # experts alone quantized vs the float model holding their dequantized values: equal, so the only error is
    # the weights' rounding
    only = quantize_model(copy.deepcopy(ref), method, skip=NOT_EXPERTS)
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in only.modules())
    rounded = eager(copy.deepcopy(ref))
    for name, s in stacks(only).items():
        rounded.get_parameter(name).data.copy_(s.dequantized_weight())
    torch.testing.assert_close(logits(only), logits(rounded), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(eager(dequantize_model(only))), logits(rounded), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [QuantConfig(method="nf4"), QuantConfig(method="fp4", blocksize=128),
                                 QuantConfig(method="nf4", double_quant=True), QuantConfig(method="int8")])
def test_each_expert_is_stored_exactly_as_its_linear(cfg):
    w = torch.randn(3, 48, 40)  # 1920 elements per expert: blocks never straddle two experts
    s = QuantizedExperts(3, 48, 40, cfg, device="meta", dtype=w.dtype).load_from_float(w)
    total = 0
    for e in range(3):
        lin = nn.Linear(40, 48, bias=False)
        lin.weight.data.copy_(w[e])
        ql = (Linear8bit if cfg.method == "int8" else Linear4bit).from_linear(lin, cfg)
        for name, buf in s.named_buffers():
            torch.testing.assert_close(buf[e].reshape(-1), getattr(ql, name).reshape(-1), rtol=0, atol=0)
        torch.testing.assert_close(s[torch.tensor(e)], ql.dequantized_weight(), rtol=0, atol=0)
        total += shardq.quant.sizing.quantized_weight_bytes(48, 40, cfg)
    assert memory_footprint(s) == total
    with pytest.raises(TypeError, match="experts_implementation='eager'"):
        s[torch.tensor([0, 1])]


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_bytes_are_the_stored_bytes(refs, arch):
    ref, _ = refs[arch]
    none = plan_model(ref, quant="none", max_memory={"cpu": "1GB"})
    nf4 = plan_model(ref, quant="nf4", max_memory={"cpu": "1GB"})
    check_plan(ref, nf4)
    check_plan(ref, none)
    assert nf4.totals["cpu"] == memory_footprint(quantize_model(copy.deepcopy(ref), "nf4"))
    assert none.totals["cpu"] == memory_footprint(ref)
    assert nf4.totals["cpu"] < 0.4 * none.totals["cpu"]  # fp32 embeddings and norms stay: less than 8x
    assert not any("fused MoE expert" in w for w in nf4.warnings)
    double = QuantConfig(method="nf4", double_quant=True)
    assert plan_model(ref, quant=double, max_memory={"cpu": "1GB"}).totals["cpu"] == \
        memory_footprint(quantize_model(copy.deepcopy(ref), double))


def offload_map(model: nn.Module) -> dict:
    """Every other block on disk, the rest on the CPU."""
    units = decompose(model, set(no_split_modules(model)))
    return {u: ("disk" if i % 2 else "cpu") for i, u in enumerate(units)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_load_sharded_quantizes_stacks_on_load(refs, arch, method, tmp_path):
    ref, ckpt = refs[arch]
    model = meta_model_from_dir(ckpt)
    model = load_sharded(model, ckpt, quant=method, max_memory={"cpu": "1GB", "disk": "1GB"},
                         device_map=offload_map(model), offload_dir=tmp_path / "off", progress=False)
    assert "disk" in model.shardq_plan.device_map.values()
    assert len(stacks(model)) == 2 * ref.config.num_hidden_layers
    got = logits(model)  # with a GPU, offloaded blocks stream to it and run the CUDA kernels: compare there
    want = quantize_model(copy.deepcopy(ref), method).to(got.device)
    torch.testing.assert_close(got, logits(want), rtol=1e-4, atol=1e-4)
    ids = IDS.to(got.device)
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    out = model.generate(ids, **kw)
    assert out.shape == (2, IDS.shape[1] + 4)
    torch.testing.assert_close(out, want.generate(ids, **kw), rtol=0, atol=0)


def test_skip_names_keep_experts_float(refs):
    ref, _ = refs["mixtral"]
    cfg = QuantConfig(method="nf4", skip_modules=("lm_head", "experts"))
    q = quantize_model(copy.deepcopy(ref), cfg)
    assert stacks(q) == {} and any(isinstance(m, Linear4bit) for m in q.modules())
    assert q.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    p = plan_model(ref, quant=cfg, max_memory={"cpu": "1GB"})
    assert p.totals["cpu"] == memory_footprint(q) and not any("fused MoE expert" in w for w in p.warnings)
    one = quantize_model(copy.deepcopy(ref), "nf4", skip=["model.layers.0.mlp.experts"])
    assert sorted(stacks(one)) == ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    down = quantize_model(copy.deepcopy(ref), "int8", skip=["model.layers.1.mlp.experts.down_proj"])
    assert len(stacks(down)) == 3


def test_save_quantized_refuses_stacks_and_saves_with_experts_skipped(refs, tmp_path):
    ref, _ = refs["mixtral"]
    q = quantize_model(copy.deepcopy(ref), "nf4")
    with pytest.raises(ValueError, match=r"fused MoE expert stack\(s\) are quantized .*'model.layers.0.mlp.experts"):
        shardq.save_quantized(q, tmp_path / "q")
    assert not (tmp_path / "q").exists()  # refused before anything is written
    kept = quantize_model(copy.deepcopy(ref), "nf4", skip=["experts"])
    assert (shardq.save_quantized(kept, tmp_path / "k") / "model.safetensors").exists()


class TransposedExperts(nn.Module):
    """The [E, in, out] layout (as GPT-OSS stores it) that shardq leaves float."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.has_gate, self.is_transposed = 2, True, True
        self.gate_up_proj = nn.Parameter(torch.randn(2, 16, 32))


def test_transposed_stacks_stay_float_with_a_warning():
    model = nn.Sequential(nn.Linear(16, 16), TransposedExperts())
    quantize_model(model, "nf4")
    assert stacks(model) == {} and model[1].gate_up_proj.dim() == 3
    p = plan_model(model, quant="nf4", max_memory={"cpu": "1GB"})
    assert any("1 fused MoE expert tensor(s) (e.g. '1.gate_up_proj'" in w and "bitsandbytes" in w for w in p.warnings)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_quantized_stacks_on_gpu_match_the_cpu(refs, arch, method):
    """Quantized on the GPU (the CUDA quantize/dequantize ops on per-expert slices) and run there in fp32: the
    same stored bytes as on the CPU, and logits equal within fp32 summation-order error."""
    ref, _ = refs[arch]
    cpu = quantize_model(copy.deepcopy(ref), method)
    gpu = quantize_model(copy.deepcopy(ref).cuda(), method)
    for name, stack in stacks(cpu).items():
        other = dict(gpu.named_modules())[name]
        for key, t in stack.state_dict().items():
            assert torch.equal(t, other.state_dict()[key].cpu()), f"{name}.{key} differs from the CPU's"
    with torch.no_grad():
        got = gpu(input_ids=IDS.cuda()).logits.cpu()
    torch.testing.assert_close(got, logits(cpu), rtol=1e-4, atol=1e-4)


def test_prequantized_checkpoint_with_float_experts_gets_them_quantized_on_load(refs, tmp_path):
    """A bitsandbytes-layout checkpoint whose linears are quantized and whose fused experts are float (what
    transformers + bitsandbytes writes for a MoE model): the linears load as stored, the experts are quantized
    on load with the checkpoint's method, so the model equals quantize_model's."""
    ref, _ = refs["mixtral"]
    kept = quantize_model(copy.deepcopy(ref), "nf4", skip=["experts"])
    ckpt = shardq.save_quantized(kept, tmp_path / "k")
    model = load_sharded(meta_model_from_dir(ckpt), ckpt, max_memory={"cpu": "1GB"}, progress=False)
    assert len(stacks(model)) == 4
    torch.testing.assert_close(logits(model), logits(quantize_model(copy.deepcopy(ref), "nf4")), rtol=1e-5, atol=1e-5)
