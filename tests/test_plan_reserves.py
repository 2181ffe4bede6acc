"""Reserves of generation (KV cache, decode graph pools) and QLoRA training, checked against hand formulas and
against what transformers' StaticCache and PEFT actually allocate."""

from __future__ import annotations

import pytest
import torch
import transformers
from _f_models import meta_model, tiny_config
from _f_plan_checks import check_plan

from shardq.cli import main
from shardq.planning import Training
from shardq.planning.planner import PlanError, plan_model
from shardq.planning.report import format_plan

BIG = {0: "1GB", 1: "1GB", "cpu": "4GB"}
SPLIT = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
         "model.layers.3": "cpu", "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}


def _llama_cfg(**kw):
    """GQA with a head_dim unlike hidden / heads (Qwen3, Gemma): 4 heads of 8, 2 KV heads."""
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=256, max_position_embeddings=512)
    return transformers.LlamaConfig(**{**base, **kw})


def _neox_cfg():
    """GPT-NeoX: no KV heads in the config (as many as the attention heads), head_dim = hidden / heads."""
    return transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, vocab_size=256, max_position_embeddings=512)


def _meta(cls, cfg, dtype=torch.float16):
    with torch.device("meta"):
        return cls._from_config(cfg, dtype=dtype).eval()


def _real(cls, cfg):
    torch.manual_seed(0)
    return cls(cfg).float().eval()


def _kv(plan, dev) -> int:
    return plan.reserve_detail[dev].get("kv cache", 0)


def _kv_total(plan) -> int:
    return sum(_kv(plan, d) for d in plan.budgets)


def _kv_layer(batch, ctx, kv_heads, head_dim, itemsize) -> int:
    """By hand: K and V of one layer."""
    return 2 * batch * ctx * kv_heads * head_dim * itemsize


def test_kv_cache_per_device_llama_gqa():
    """Layers 0-1 on GPU 0, layer 2 on GPU 1, layer 3 on the CPU streamed to GPU 0 (its cache lives there)."""
    m = _meta(transformers.LlamaForCausalLM, _llama_cfg())
    p = plan_model(m, None, max_memory=BIG, gpus="2x1GB", device_map=SPLIT, workload=(3, 100))
    check_plan(m, p)
    layer = _kv_layer(3, 100, 2, 8, 2)
    assert p.kv_cache and p.device_map["model.layers.3"] == "cpu" and p.offload_modes["model.layers.3"] == "stream"
    assert (_kv(p, 0), _kv(p, 1), _kv(p, "cpu")) == (3 * layer, layer, 0)
    forced = plan_model(m, None, max_memory=BIG, gpus="2x1GB", device_map=SPLIT, workload=(3, 100),
                        offload_mode={"model.layers.3": "cpu"})
    assert (_kv(forced, 0), _kv(forced, "cpu")) == (2 * layer, 2 * layer)  # computed on the CPU: fp32 there


def test_kv_cache_of_coarse_explicit_maps():
    """Map entries above the blocks (a parent module) are the units: their layers' caches are counted there."""
    m = _meta(transformers.LlamaForCausalLM, _llama_cfg())
    layer = _kv_layer(1, 32, 2, 8, 2)
    p = plan_model(m, None, max_memory=BIG, gpus="2x1GB", device_map={"model": 1, "lm_head": 0}, workload=(1, 32))
    assert (_kv(p, 0), _kv(p, 1)) == (0, 4 * layer)
    p = plan_model(m, None, max_memory=BIG, gpus="2x1GB", workload=(1, 32),
                   device_map={"model.embed_tokens": 1, "model.layers": "cpu", "model.norm": 1,
                               "model.rotary_emb": 1, "lm_head": 1})
    assert (_kv(p, 0), _kv(p, 1)) == (0, 4 * layer)  # streamed to the map's first GPU, GPU 1


def test_kv_cache_per_device_neox():
    m = _meta(transformers.GPTNeoXForCausalLM, _neox_cfg())
    split = {"gpt_neox.embed_in": 0, "gpt_neox.layers.0": 0, "gpt_neox.layers.1": 1, "gpt_neox.layers.2": 1,
             "gpt_neox.layers.3": "disk", "gpt_neox.final_layer_norm": 1, "gpt_neox.rotary_emb": 1, "lm_head": 1}
    p = plan_model(m, "nf4", max_memory={**BIG, "disk": "1GB"}, gpus="2x1GB", device_map=split, workload=(2, 50),
                   offload_dir="/tmp/unused")
    layer = _kv_layer(2, 50, 4, 16, 2)
    assert (_kv(p, 0), _kv(p, 1), _kv(p, "cpu"), _kv(p, "disk")) == (2 * layer, 2 * layer, 0, 0)


def test_kv_cache_of_opt_split_by_the_planner():
    m = meta_model("opt", hidden=64, layers=4)
    p = plan_model(m, "int8", max_memory={0: "40KB", 1: "1GB", "cpu": "1GB"}, gpus="2x1GB", workload=(1, 64),
                   device_map="sequential")
    check_plan(m, p)
    layer = _kv_layer(1, 64, 2, 32, 2)
    held = {d: sum(1 for k, v in p.device_map.items() if ".layers." in k and v == d) for d in (0, 1)}
    assert held[0] + held[1] == 4 and held[1] > 0
    assert (_kv(p, 0), _kv(p, 1)) == (held[0] * layer, held[1] * layer)


def _static_cache_bytes(model, cfg, batch: int, ctx: int, prompt: int) -> int:
    cache = transformers.StaticCache(config=cfg, max_cache_len=ctx)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("cls,cfg", [
    (transformers.LlamaForCausalLM, _llama_cfg()),
    (transformers.GPTNeoXForCausalLM, _neox_cfg()),
    (transformers.MistralForCausalLM, transformers.MistralConfig(  # sliding window shorter than the context
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        vocab_size=256, sliding_window=24, max_position_embeddings=512)),
], ids=["llama", "gpt_neox", "mistral_sliding"])
def test_kv_cache_equals_what_a_static_cache_allocates(cls, cfg):
    model = _real(cls, cfg)
    actual = _static_cache_bytes(model, cfg, batch=2, ctx=40, prompt=5)
    on_gpu = plan_model(model, None, max_memory={0: "1GB"}, gpus="1x1GB", workload=(2, 40))  # fp32, as built
    on_cpu = plan_model(model, None, max_memory={"cpu": "1GB"}, gpus=[], workload=(2, 40))
    assert _kv_total(on_gpu) == _kv(on_gpu, 0) == actual
    assert _kv_total(on_cpu) == _kv(on_cpu, "cpu") == actual


def test_kv_cache_is_on_for_causal_lms_only():
    llama = meta_model("llama")
    assert plan_model(llama, None, max_memory={0: "1GB"}, gpus="1x1GB").kv_cache
    assert not plan_model(llama, None, max_memory={0: "1GB"}, gpus="1x1GB", kv_cache=False).kv_cache
    base = _meta(transformers.LlamaModel, tiny_config("llama"))
    assert not plan_model(base, None, max_memory={0: "1GB"}, gpus="1x1GB").kv_cache
    t5 = meta_model("t5")
    assert not plan_model(t5, None, max_memory={0: "1GB"}, gpus="1x1GB").kv_cache
    with pytest.raises(PlanError, match="kv_cache=True"):
        plan_model(t5, None, max_memory={0: "1GB"}, gpus="1x1GB", kv_cache=True)
    with pytest.raises(PlanError, match="kv_cache="):
        plan_model(llama, None, max_memory={0: "1GB"}, gpus="1x1GB", kv_cache="yes")
    trained = plan_model(llama, None, max_memory={0: "1GB"}, gpus="1x1GB", training=True)
    assert not trained.kv_cache and trained.training == Training(16, "all-linear")
    assert trained.to_dict()["training"] == {"rank": 16, "target_modules": "all-linear"}


def test_decode_graph_reserve_formula():
    """Unquantized (no matmul scratch), one GPU holding everything: step + head + static buffers, by hand."""
    m = _meta(transformers.LlamaForCausalLM, _llama_cfg())
    b, s, hidden, inter, heads, vocab, isz = 2, 64, 64, 128, 4, 256, 2
    p = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x1GB", workload=(b, s))
    step = b * ((12 * hidden + 4 * inter) * isz + (2 * heads + 1) * s * 4)
    head = b * vocab * (isz + 4)
    buffers = b * (8 * (2 * s + 4) + 4 * vocab)
    assert p.reserve_detail[0]["decode graphs"] == step + head + buffers
    off = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x1GB", workload=(b, s), kv_cache=False)
    assert "decode graphs" not in off.reserve_detail[0] and "kv cache" not in off.reserve_detail[0]


def _tight_gpu(m, quant, workload, **kw) -> int:
    """A GPU cap that holds the model, its forward reserves and 1 KiB more, but no other reserve."""
    p = plan_model(m, quant, max_memory={0: "1GB"}, gpus="1x1GB", workload=workload, kv_cache=False, **kw)
    assert all(isinstance(d, int) for d in p.device_map.values())
    return p.totals[0] + p.reserves[0] + 1024


def test_a_cap_without_room_for_the_kv_cache():
    m = _meta(transformers.LlamaForCausalLM, _llama_cfg())
    wl = (8, 256)
    cap = _tight_gpu(m, "nf4", wl)
    old = plan_model(m, "nf4", max_memory={0: cap, 1: "1GB"}, gpus="2x1GB", workload=wl, kv_cache=False,
                     device_map="sequential")
    assert set(old.device_map.values()) == {0}
    with pytest.raises(PlanError, match="KV cache") as info:
        plan_model(m, "nf4", max_memory={0: cap}, gpus="1x1GB", workload=wl)
    assert "kv_cache=False" in str(info.value) and "shrink the workload" in str(info.value)
    moved = plan_model(m, "nf4", max_memory={0: cap, 1: "1GB"}, gpus="2x1GB", workload=wl, device_map="sequential")
    check_plan(m, moved)
    assert moved.device_map != old.device_map and 1 in moved.device_map.values()  # the head or layers moved
    again = plan_model(m, "nf4", max_memory={0: cap, 1: "1GB"}, gpus="2x1GB", workload=wl, kv_cache=False,
                       device_map="sequential")
    assert again.device_map == old.device_map


def test_a_streamed_block_brings_its_kv_cache_to_the_execution_gpu():
    """Streaming a block off a full GPU frees its weights but not its cache: the plan counts it on GPU 0."""
    m = _meta(transformers.LlamaForCausalLM, _llama_cfg(num_hidden_layers=6))
    wl = (1, 128)
    cap = _tight_gpu(m, "nf4", wl) - 20_000  # two layers' weights short
    p = plan_model(m, "nf4", max_memory={0: cap, "cpu": "1GB"}, gpus="1x1GB", workload=wl)
    check_plan(m, p)
    streamed = [k for k, r in p.offload_modes.items() if r == "stream" and ".layers." in k]
    cpu_run = [k for k, r in p.offload_modes.items() if r == "cpu" and ".layers." in k]
    layer = _kv_layer(1, 128, 2, 8, 2)
    assert streamed or cpu_run
    assert _kv(p, 0) == (6 - len(cpu_run)) * layer and _kv(p, "cpu") == len(cpu_run) * 2 * layer


def _lora_count(cls, cfg, **lora) -> int:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_real(cls, cfg), peft.LoraConfig(**lora))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("cls,cfg", [(transformers.LlamaForCausalLM, _llama_cfg()),
                                     (transformers.GPTNeoXForCausalLM, _neox_cfg()),
                                     (transformers.OPTForCausalLM, tiny_config("opt"))], ids=["llama", "neox", "opt"])
def test_lora_states_equal_what_peft_creates(cls, cfg):
    n = _lora_count(cls, cfg, r=16, target_modules="all-linear")
    p = plan_model(_real(cls, cfg), None, max_memory={0: "1GB"}, gpus="1x1GB", workload=(1, 16), training=True)
    assert p.reserve_detail[0]["lora states"] == n * 4 * (1 + 1 + 2)  # fp32 weights, gradients, two Adam moments
    n8 = _lora_count(cls, cfg, r=8, target_modules=["q_proj", "v_proj", "query_key_value"])
    p8 = plan_model(_real(cls, cfg), None, max_memory={0: "1GB"}, gpus="1x1GB", workload=(1, 16),
                    training=Training(8, ("q_proj", "v_proj", "query_key_value")))
    assert p8.reserve_detail[0]["lora states"] == n8 * 16


def test_training_terms_by_hand():
    """Checkpoints, recompute and logits gradient on one GPU; a streamed block keeps the two stream slots and
    brings its adapters and checkpoint to the execution GPU."""
    m = _meta(transformers.LlamaForCausalLM, _llama_cfg())
    b, s, hidden, inter, heads, vocab, isz = 2, 32, 64, 128, 4, 256, 2
    p = plan_model(m, None, max_memory=BIG, gpus="2x1GB", device_map=SPLIT, workload=(b, s), training=True)
    check_plan(m, p)
    act = (b * s * (6 * hidden + 2 * inter) + 2 * b * heads * s * s) * isz
    one = b * s * hidden * isz
    d0, d1 = p.reserve_detail[0], p.reserve_detail[1]
    assert (d0["checkpoints"], d1["checkpoints"]) == (3 * one, one)  # layers 0, 1 and the streamed 3; layer 2
    assert d0["recompute"] == d1["recompute"] == 2 * act
    assert d1["logits grad"] == 2 * b * s * vocab * 4 and "logits grad" not in d0  # the head is on GPU 1
    assert d0["stream"] > 0 and d0["lora states"] == 3 * d1["lora states"]


def test_a_cap_that_fits_inference_but_not_training():
    m = _meta(transformers.LlamaForCausalLM, _llama_cfg())
    wl = (2, 64)
    cap = _tight_gpu(m, "nf4", wl)
    plan_model(m, "nf4", max_memory={0: cap}, gpus="1x1GB", workload=wl, kv_cache=False)
    with pytest.raises(PlanError, match="LoRA training") as info:
        plan_model(m, "nf4", max_memory={0: cap}, gpus="1x1GB", workload=wl, training=True)
    assert "shrink the workload or the rank" in str(info.value)
    moved = plan_model(m, "nf4", max_memory={0: cap, 1: "1GB"}, gpus="2x1GB", workload=wl, training=True,
                       device_map="sequential")
    check_plan(m, moved)
    assert 1 in moved.device_map.values()


@pytest.mark.parametrize("bad", [Training(0), Training(16, ()), "yes", Training(16, (3,))])  # type: ignore[arg-type]
def test_bad_training_arguments(bad):
    with pytest.raises(PlanError, match="training=|Training\\("):
        plan_model(meta_model("llama"), None, max_memory={0: "1GB"}, gpus="1x1GB", training=bad)


def test_report_and_cli_show_the_reserves(tmp_path, capsys):
    m = _meta(transformers.LlamaForCausalLM, _llama_cfg())
    text = format_plan(plan_model(m, None, max_memory={0: "1GB"}, gpus="1x1GB"))
    assert "generation: KV cache and decode graphs reserved" in text and "kv cache" in text
    text = format_plan(plan_model(m, None, max_memory={0: "1GB"}, gpus="1x1GB", training=Training(4)))
    assert "training: LoRA rank 4 on all-linear" in text and "lora states" in text and "recompute" in text
    _llama_cfg().save_pretrained(tmp_path)
    cfg = str(tmp_path / "config.json")
    assert main([cfg, "--gpus", "1x1GB", "--seq-len", "64"]) == 0
    assert "kv cache" in capsys.readouterr().out
    assert main([cfg, "--gpus", "1x1GB", "--no-kv-cache"]) == 0
    out = capsys.readouterr().out
    assert "kv cache" not in out and "forward only" in out
    assert main([cfg, "--gpus", "1x1GB", "--train", "--lora-rank", "8", "--lora-targets", "q_proj,v_proj"]) == 0
    assert "training: LoRA rank 8 on q_proj,v_proj" in capsys.readouterr().out
    assert main([cfg, "--gpus", "1x1GB", "--lora-rank", "8"]) == 2
