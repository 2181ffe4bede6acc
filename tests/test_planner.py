"""Planner on real transformers architectures (meta device): exact sizes, caps with reserves, strategies, errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from _f_models import ARCHS, meta_model
from _f_plan_checks import check_plan, meta_linear, oracle_weight_bytes
from shardq.quant import sizing
from shardq.config import QuantConfig
from shardq.planning.planner import PlanError, plan_model

QUANTS = [QuantConfig(), QuantConfig(method="int8"), QuantConfig(method="nf4"), QuantConfig(method="fp4"),
          QuantConfig(method="nf4", double_quant=True), QuantConfig(method="fp4", blocksize=128, double_quant=True),
          QuantConfig(method="int8", fp32_cpu_offload=True), QuantConfig(method="nf4", blocksize=32)]
SEED_MAP = {"transformer.word_embeddings": 0, "transformer.word_embeddings_layernorm": 0, "lm_head": "cpu",
            "transformer.h": 0, "transformer.ln_f": 0}
WL = (1, 16)


@pytest.fixture(scope="module")
def models():
    return {a: meta_model(a, hidden=128, layers=4, vocab=640) for a in ARCHS}


# ---------------------------------------------------------------- sizing

@pytest.mark.parametrize("quant", QUANTS[1:6], ids=lambda q: f"{q.method}{'-dq' if q.double_quant else ''}")
def test_weight_bytes_match_oracle_over_shapes(quant):
    rng = random.Random(0)
    shapes = [(1, 1), (3, 5), (7, 64), (64, 64), (256, 1), (1000, 37), (4096, 11008)]
    shapes += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(40)]
    for out_f, in_f in shapes:
        assert sizing.quantized_weight_bytes(out_f, in_f, quant) == oracle_weight_bytes(meta_linear(out_f, in_f), quant)


@pytest.mark.parametrize("quant", QUANTS[1:6], ids=lambda q: f"{q.method}{'-dq' if q.double_quant else ''}")
def test_weight_bytes_match_the_quantized_modules(quant):
    """shardq.quant's Linear4bit/Linear8bit really store what the planner counts (bias included)."""
    from shardq.quant.linear import Linear4bit, Linear8bit, quantized_bytes

    cls = Linear8bit if quant.method == "int8" else Linear4bit
    rng = random.Random(1)
    for _ in range(25):
        out_f, in_f, bias = rng.randint(1, 700), rng.randint(1, 700), rng.random() < 0.5
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
        layer = cls.empty(in_f, out_f, bias, quant, "meta", dtype)
        expected = sizing.quantized_weight_bytes(out_f, in_f, quant) + (out_f * dtype.itemsize if bias else 0)
        assert quantized_bytes(layer) == expected


def test_quantized_model_footprint_equals_plan_total():
    """Quantize a real (random-weight) model with shardq.quant and compare to the planner's bytes."""
    from _f_models import model_class, tiny_config
    from shardq.quant.linear import memory_footprint
    from shardq.quant.convert import quantize_model

    torch.manual_seed(0)
    for quant in (QuantConfig(method="int8"), QuantConfig(method="nf4", double_quant=True)):
        model = model_class("llama")(tiny_config("llama", hidden=64, layers=2, vocab=256)).to(torch.float16)
        planned = plan_model(model, quant, max_memory={0: "1GB"}, gpus="1x2GB", workload=WL)
        quantize_model(model, quant)
        assert memory_footprint(model) == planned.totals[0]


def test_tied_head_is_not_quantized_and_counted_once(models):
    m = models["bloom"]
    q = QuantConfig(method="int8", skip_modules=())  # even when lm_head is not skipped, the tied head stays fp16
    entries = sizing.tensor_entries(m, q)
    assert not entries["lm_head.weight"].quantized
    assert entries["lm_head.weight"].key == entries["transformer.word_embeddings.weight"].key
    p = plan_model(m, q, max_memory={0: "1GB"}, gpus="1x2GB", workload=WL)
    emb = m.transformer.word_embeddings.weight
    assert p.totals[0] == sizing.unique_bytes(list(entries.values()))
    assert p.totals[0] < sum(e.stored for e in entries.values())  # the shared tensor is not counted twice
    assert p.device_map["lm_head"] == p.device_map["transformer.word_embeddings"]
    assert emb.numel() * 2 == entries["lm_head.weight"].stored


def test_accelerate_agrees_on_unquantized_size(models):
    from accelerate.utils import compute_module_sizes

    for arch, m in models.items():
        p = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=WL)
        assert p.totals[0] == compute_module_sizes(m)[""], arch


def test_skip_modules_keep_dtype(models):
    m = models["llama"]
    q = QuantConfig(method="nf4", skip_modules=("lm_head", "mlp"))
    e = sizing.tensor_entries(m, q)
    assert not e["model.layers.0.mlp.up_proj.weight"].quantized
    assert e["model.layers.0.self_attn.q_proj.weight"].quantized
    assert not e["lm_head.weight"].quantized


# ---------------------------------------------------------------- caps hold over many budgets

def _random_caps(rng: random.Random, model_bytes: int, n_gpus: int) -> dict:
    caps = {i: int(model_bytes * rng.uniform(0.05, 0.9)) for i in range(n_gpus)}
    if rng.random() < 0.8:
        caps["cpu"] = int(model_bytes * rng.uniform(0.1, 1.5))
    if rng.random() < 0.7:
        caps["disk"] = int(model_bytes * rng.uniform(0.5, 3))
    return caps


@pytest.mark.parametrize("arch", ARCHS)
def test_random_budgets_every_cap_holds(models, arch):
    """Hypothesis-style sweep: for each budget set the plan keeps every cap, or raises a PlanError."""
    m = models[arch]
    rng = random.Random(ARCHS.index(arch))
    size = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=WL).totals[0]
    planned = failed = 0
    for trial in range(60):
        quant = rng.choice(QUANTS)
        n_gpus = rng.choice([1, 2, 3])
        caps = _random_caps(rng, size, n_gpus)
        strategy = rng.choice(["auto", "sequential", "balanced"])
        workload = (rng.choice([1, 2]), rng.choice([8, 32]))
        try:
            p = plan_model(m, quant, max_memory=caps, gpus=[10**10] * n_gpus, device_map=strategy, workload=workload)
        except PlanError as exc:
            assert "max_memory" in str(exc)
            failed += 1
            continue
        check_plan(m, p)
        planned += 1
    assert planned >= 25, (planned, failed)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_explicit_maps_are_checked_against_caps(models, arch):
    """Random accelerate-style maps over the top-level blocks: the plan is exact and within caps, or refused."""
    from shardq.planning.planner import decompose
    from shardq import hf

    m = models[arch]
    units = decompose(m, set(hf.no_split_modules(m)))
    rng = random.Random(100 + ARCHS.index(arch))
    size = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=WL).totals[0]
    outcomes = set()
    for _ in range(20):
        quant = rng.choice(QUANTS)
        dm = {u: rng.choice([0, 1, "cpu", "disk"]) for u in units}
        caps = {0: int(size * rng.uniform(0.3, 1.5)), 1: int(size * rng.uniform(0.3, 1.5)),
                "cpu": int(size * rng.uniform(0.5, 4)), "disk": 10**9}
        try:
            p = plan_model(m, quant, max_memory=caps, gpus="2x1GB", device_map=dm, workload=WL)
        except PlanError as exc:
            assert "over its max_memory" in str(exc)
            outcomes.add("refused")
            continue
        check_plan(m, p, tied_together=False)
        assert all(p.device_map[u] == d for u, d in dm.items())
        outcomes.add("planned")
    assert "planned" in outcomes


@pytest.mark.parametrize("arch", ARCHS)
def test_generous_budgets_put_everything_on_gpu(models, arch):
    p = plan_model(models[arch], "nf4", max_memory={0: "1GB", "cpu": "1GB"}, gpus="1x2GB", workload=WL)
    check_plan(models[arch], p)
    assert set(p.device_map.values()) == {0}
    assert p.offload_modes == {} and p.execution_device == 0


# ---------------------------------------------------------------- strategies

def test_sequential_fills_gpus_in_order_and_balanced_spreads(models):
    m = models["llama"]
    seq = plan_model(m, None, max_memory={0: "5MB", 1: "5MB", 2: "5MB"}, gpus="3x8MB", device_map="sequential",
                     workload=WL)
    bal = plan_model(m, None, max_memory={0: "5MB", 1: "5MB", 2: "5MB"}, gpus="3x8MB", device_map="balanced",
                     workload=WL)
    check_plan(m, seq)
    check_plan(m, bal)
    assert seq.totals[2] == 0 and seq.totals[0] >= seq.totals[1]
    assert all(bal.totals[g] > 0 for g in range(3))
    assert max(bal.totals[g] for g in range(3)) < seq.totals[0]
    # "auto" balances as transformers' device_map="auto" does
    assert plan_model(m, None, max_memory={0: "5MB", 1: "5MB"}, gpus="2x8MB", workload=WL).device_map == \
        plan_model(m, None, max_memory={0: "5MB", 1: "5MB"}, gpus="2x8MB", device_map="balanced",
                   workload=WL).device_map


def test_no_split_blocks_stay_whole(models):
    m = models["opt"]
    p = plan_model(m, None, max_memory={0: "300KB", 1: "10MB"}, gpus="2x1GB", workload=WL)
    names = set(p.device_map)
    assert {f"model.decoder.layers.{i}" for i in range(4)} <= names
    assert not any(n.startswith("model.decoder.layers.0.") for n in names)
    fine = plan_model(m, None, max_memory={0: "300KB", 1: "10MB"}, gpus="2x1GB", no_split=[], workload=WL)
    assert any(n.startswith("model.decoder.layers.0.") for n in fine.device_map)
    check_plan(m, fine)


def test_user_no_split_by_module_name(models):
    m = models["llama"]
    p = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", no_split=["model"], workload=WL)
    assert list(p.device_map) == ["model", "lm_head"]


def test_offload_modes(models):
    m = models["llama"]
    caps = {0: "1MB", "cpu": "2MB", "disk": "10MB"}
    streamed = plan_model(m, "int8", max_memory=caps, gpus="1x2GB", workload=WL)
    assert streamed.cpu_mode == "stream" and set(streamed.offload_modes.values()) <= {"stream", "disk"}
    assert "stream" in streamed.offload_modes.values()
    check_plan(m, streamed)
    fp32 = plan_model(m, QuantConfig(method="int8", fp32_cpu_offload=True), max_memory={**caps, "cpu": "8MB"},
                      gpus="1x2GB", workload=WL)
    assert fp32.cpu_mode == "cpu" and "cpu" in fp32.offload_modes.values()
    assert all(p.quant == "fp32" for p in fp32.placements if p.device == "cpu")
    assert "stream" not in fp32.reserve_detail[0]
    check_plan(m, fp32)
    forced = plan_model(m, "int8", max_memory={**caps, "cpu": "8MB"}, gpus="1x2GB", offload_mode="cpu", workload=WL)
    assert forced.cpu_mode == "cpu"
    check_plan(m, forced)
    # fp32 blocks that spill to disk are read back into the GPU's stream slots
    deep = meta_model("llama", hidden=128, layers=16, vocab=640)
    spill = plan_model(deep, QuantConfig(method="int8", fp32_cpu_offload=True), max_memory={0: "2.5MB", "cpu": "2.5MB",
                       "disk": "20MB"}, gpus="1x2GB", workload=WL)
    check_plan(deep, spill)
    assert "disk" in spill.offload_modes.values() and spill.reserve_detail[0]["stream"] > 0


def test_no_gpu_runs_on_cpu(models, monkeypatch):
    """Without a GPU blocks compute on the CPU: unquantized ones in fp32, quantized weights stay packed."""
    from shardq import memory

    monkeypatch.setattr(memory, "gpu_count", lambda: 0)
    for quant, storages in (("nf4", {"nf4", "fp32"}), (None, {"fp32"}),
                            (QuantConfig(method="int8", fp32_cpu_offload=True), {"fp32"})):
        p = plan_model(models["t5"], quant, max_memory={"cpu": "100MB"}, workload=WL)
        assert p.execution_device is None and p.cpu_mode == "cpu"
        assert {pl.quant for pl in p.placements} == storages
        check_plan(models["t5"], p)
    p = plan_model(models["t5"], "nf4", max_memory={"cpu": "1.1MB", "disk": "100MB"}, workload=WL)
    assert "disk" in p.offload_modes.values()
    check_plan(models["t5"], p)
    with pytest.raises(PlanError, match="offload_mode='stream' needs a GPU"):
        plan_model(models["t5"], "nf4", max_memory={"cpu": "100MB"}, offload_mode="stream", workload=WL)


def test_activation_reserve_grows_with_workload(models):
    m = models["llama"]
    small = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=(1, 16))
    big = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=(4, 256))
    assert big.reserve_detail[0]["activations"] > 16 * small.reserve_detail[0]["activations"]
    dims = sizing.model_dims(m)
    assert big.reserve_detail[0]["activations"] == sizing.activation_bytes(dims, 4, 256, 2) + sizing.head_bytes(dims, 4, 256)


def test_load_reserve_covers_largest_quantized_tensor(models):
    m = models["llama"]
    p = plan_model(m, "nf4", max_memory={0: "1GB"}, gpus="1x2GB", workload=WL)
    mlp = m.model.layers[0].mlp.up_proj.weight
    assert p.reserve_detail[0]["load"] == mlp.numel() * (2 + 4)


# ---------------------------------------------------------------- the seed case and explicit maps

def test_seed_bloom_map_int8_fp32_cpu_offload():
    m = meta_model("bloom", hidden=256, layers=4, vocab=1024)
    q = QuantConfig.from_any({"load_in_8bit": True, "llm_int8_enable_fp32_cpu_offload": True})
    p = plan_model(m, q, device_map=SEED_MAP, gpus="1x24GB", workload=(1, 64),
                   max_memory={0: "20GB", "cpu": "8GB"})
    check_plan(m, p, tied_together=False)
    assert p.strategy == "explicit"
    assert p.device_map["lm_head"] == "cpu" and p.offload_modes == {"lm_head": "cpu"}
    assert {p.device_map[f"transformer.h.{i}"] for i in range(4)} == {0}
    head = next(x for x in p.placements if x.name == "lm_head")
    assert head.quant == "fp32" and head.nbytes == 1024 * 256 * 4 and head.run == "cpu"
    assert {x.quant for x in p.placements if x.name.startswith("transformer.h.")} == {"int8"}
    assert any("tied" in w for w in p.warnings)  # the tied embedding lives on GPU 0 and, in fp32, on the CPU
    assert p.totals["cpu"] == 1024 * 256 * 4


def test_seed_map_with_default_budgets(monkeypatch):
    """As a transformers user writes it: no max_memory, budgets detected (here: one mocked GPU)."""
    from shardq import memory

    monkeypatch.setattr(memory, "gpu_count", lambda: 1)
    monkeypatch.setattr(memory, "gpu_free_memory", lambda i: (16 * 2**30, 24 * 2**30))
    m = meta_model("bloom", hidden=128, layers=2, vocab=512)
    p = plan_model(m, {"load_in_8bit": True, "llm_int8_enable_fp32_cpu_offload": True}, device_map=SEED_MAP)
    assert p.budgets[0] == 16 * 2**30 - memory.GPU_MARGIN
    check_plan(m, p, tied_together=False)


def test_explicit_map_validation(models):
    m = models["bloom"]
    kw = dict(gpus="2x1GB", workload=WL)
    with pytest.raises(PlanError, match=r"'transformer.hh' is not a module.*Did you mean"):
        plan_model(m, None, device_map={**SEED_MAP, "transformer.hh": 0}, **kw)
    with pytest.raises(PlanError, match=r"leaves .* unplaced.*transformer.ln_f"):
        plan_model(m, None, device_map={k: v for k, v in SEED_MAP.items() if k != "transformer.ln_f"}, **kw)
    with pytest.raises(PlanError, match=r"'transformer.h' and 'transformer.h.1' overlap"):
        plan_model(m, None, device_map={**SEED_MAP, "transformer.h.1": 1}, **kw)
    with pytest.raises(PlanError, match="overlap"):
        plan_model(m, None, device_map={"": 0, "lm_head": 0}, **kw)
    with pytest.raises(PlanError, match=r"names a tensor.*'lm_head'"):
        plan_model(m, None, device_map={**SEED_MAP, "lm_head.weight": 0}, **kw)
    with pytest.raises(PlanError, match=r"GPU 5.*does not exist.*\[0, 1\]"):
        plan_model(m, None, device_map={**SEED_MAP, "lm_head": 5}, **kw)
    with pytest.raises(PlanError, match="no budget in max_memory"):
        plan_model(m, None, device_map={**SEED_MAP, "lm_head": "disk"}, max_memory={0: "1GB", "cpu": "1GB"}, **kw)
    with pytest.raises(PlanError, match=r"GPU 0 would hold .* over its max_memory"):
        plan_model(m, None, device_map=SEED_MAP, max_memory={0: "10KB", "cpu": "1GB"}, **kw)
    with pytest.raises(PlanError, match="module name"):
        plan_model(m, None, device_map={0: 0}, **kw)


def test_explicit_map_accepts_every_device_spelling(models):
    m = models["llama"]
    dm = {"model.embed_tokens": "cuda:0", "model.layers": torch.device("cuda:1"), "model.norm": "1",
          "model.rotary_emb": 1, "lm_head": "disk"}
    p = plan_model(m, "nf4", device_map=dm, gpus="2x1GB", max_memory={0: "1GB", 1: "1GB", "cpu": "1GB", "disk": "1GB"},
                   workload=WL)
    check_plan(m, p, tied_together=False)
    assert p.device_map["model.embed_tokens"] == 0 and p.device_map["model.layers.3"] == 1
    assert p.offload_modes == {"lm_head": "disk"}
    assert p.reserve_detail[0]["stream"] == 2 * next(x.nbytes for x in p.placements if x.name == "lm_head")
    whole = plan_model(m, "nf4", device_map={"": 0}, gpus="1x1GB", max_memory={0: "1GB"}, workload=WL)
    assert set(whole.device_map.values()) == {0} and "model.layers.0" in whole.device_map


# ---------------------------------------------------------------- errors

def test_model_too_big_says_how_much_is_missing(models):
    m = models["llama"]
    with pytest.raises(PlanError) as err:
        plan_model(m, None, max_memory={0: "500KB", "cpu": "500KB"}, gpus="1x1GB", workload=WL)
    msg = str(err.value)
    assert "missing" in msg and "GPU 0" in msg and "cpu" in msg and "add 'disk'" in msg
    missing = int(msg.split("(")[1].split(" bytes")[0])
    total = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=WL).totals[0]
    assert 0 < missing <= total


def test_block_larger_than_any_device(models):
    with pytest.raises(PlanError, match="alone needs"):
        plan_model(models["bloom"], None, max_memory={0: "20KB", "cpu": "20KB", "disk": "20KB"}, gpus="1x1GB",
                   workload=WL)


@pytest.mark.parametrize("kwargs,match", [
    (dict(device_map="fastest"), "not a strategy"), (dict(workload=(0, 5)), "batch >= 1"),
    (dict(workload="big"), r"\(batch, seq_len\)"), (dict(offload_mode="gpu"), "offload_mode"),
    (dict(max_memory={0: "lots"}), "lots"), (dict(max_memory={7: "1GB"}), "GPU 7 does not exist"),
    (dict(quant="int3"), "int3"), (dict(max_memory={}), "names no device"),
])
def test_bad_arguments(models, kwargs, match):
    kw = dict(gpus="1x1GB", workload=WL)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_model(models["opt"], kw.pop("quant", None), **kw)


def test_plan_json_roundtrip(models):
    p = plan_model(models["t5"], "nf4", max_memory={0: "600KB", "cpu": "2MB", "disk": "1GB"}, gpus="1x1GB", workload=WL)
    d = json.loads(p.to_json())
    assert d["device_map"] == {k: v for k, v in p.device_map.items()}
    assert d["totals"] == {str(k): v for k, v in p.totals.items()}
    assert d["quant"]["method"] == "nf4" and d["offload_modes"] == p.offload_modes
    assert d["free"]["0"] == p.free(0) >= 0


def test_works_on_a_hand_written_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
                                         for _ in range(6)])
            self.head = nn.Linear(32, 100)

    with torch.device("meta"):
        net = Net().half()
    p = plan_model(net, "int8", max_memory={0: "12KB", 1: "40KB", "cpu": "1MB"}, gpus="2x1GB", workload=(1, 4))
    check_plan(net, p)
    assert p.no_split == ["Sequential"] and "blocks.0" in p.device_map


# ---------------------------------------------------------------- stream buffers: pinning and the execution GPU

def test_large_head_kept_on_gpu_instead_of_streamed():
    m = meta_model("llama", hidden=64, layers=6, vocab=4000, tie=False)
    head = 4000 * 64 * 2
    p = plan_model(m, None, max_memory={0: head * 3, "cpu": "10MB"}, gpus="1x1GB", workload=(1, 4))
    check_plan(m, p)
    assert p.device_map["lm_head"] == 0 and "stream" in p.offload_modes.values()
    streamed = [x.nbytes for x in p.placements if x.run == "stream"]
    assert p.reserve_detail[0]["stream"] == 2 * max(streamed) < head


def test_execution_gpu_moves_when_the_first_cannot_hold_stream_buffers():
    m = meta_model("llama", hidden=128, layers=6, vocab=256, tie=False)
    layer = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=WL).placements[1].nbytes
    p = plan_model(m, None, max_memory={0: int(layer * 1.5), 1: layer * 4, "cpu": "100MB"}, gpus="2x1GB",
                   workload=WL)
    check_plan(m, p)
    assert p.execution_device == 1 and "stream" in p.reserve_detail[1] and "stream" not in p.reserve_detail[0]


def test_bitsandbytes_config_as_is_and_accelerate_accepts_the_map(models):
    from accelerate.utils.modeling import check_device_map
    from transformers import BitsAndBytesConfig

    import shardq

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype="bfloat16")
    for arch, m in models.items():
        p = shardq.plan(m, bnb, max_memory={0: "900KB", 1: "600KB", "cpu": "1MB", "disk": "1GB"}, gpus="2x1GB",
                        workload=WL)
        assert p.quant.method == "nf4" and p.quant.double_quant and p.quant.compute_dtype == torch.bfloat16
        check_plan(m, p)
        check_device_map(m, p.device_map)  # accelerate's own validation: every parameter is mapped


def test_explicit_map_runs_streamed_blocks_on_its_first_gpu(models):
    m = models["llama"]
    dm = {"model.embed_tokens": 1, "model.layers": "cpu", "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    p = plan_model(m, "int8", device_map=dm, gpus="2x1GB", max_memory={0: "1GB", 1: "1GB", "cpu": "1GB"}, workload=WL)
    check_plan(m, p, tied_together=False)
    assert p.execution_device == 1 and p.reserve_detail[0] == {} and "stream" in p.reserve_detail[1]


def test_explicit_map_without_gpus_runs_on_cpu(models):
    m = models["opt"]
    p = plan_model(m, None, device_map={"": "cpu"}, gpus="1x1GB", max_memory={0: "1GB", "cpu": "1GB"}, workload=WL)
    check_plan(m, p)
    assert p.execution_device is None and p.cpu_mode == "cpu" and set(p.offload_modes.values()) == {"cpu"}
    forced = plan_model(m, None, device_map={"": "cpu"}, gpus="1x1GB", max_memory={0: "1GB", "cpu": "1GB"},
                        offload_mode="stream", workload=WL)
    assert forced.execution_device == 0 and set(forced.offload_modes.values()) == {"stream"}


def _tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(d_model=64, encoder_layers=3, decoder_layers=3, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=300,
                     max_position_embeddings=64)
    with torch.device("meta"):
        return BartForConditionalGeneration._from_config(cfg, dtype=torch.float16).eval()


def test_root_tensors_become_a_nested_entry_so_the_model_still_splits():
    """Bart keeps `final_logits_bias` on the root module: it is a unit of its own (never offloaded), and the
    blocks are placed one by one instead of the whole model as one block."""
    from accelerate.utils.modeling import check_device_map

    m = _tiny_bart()
    total = plan_model(m, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=WL).totals[0]
    p = plan_model(m, "int8", max_memory={0: total // 3, 1: total // 3, "cpu": total, "disk": "1GB"}, gpus="2x1GB",
                   workload=WL)
    check_plan(m, p)
    check_device_map(m, p.device_map)
    own = [x for x in p.placements if x.own_tensors_only]
    assert [x.name for x in own] == [""] and isinstance(own[0].device, int)
    assert own[0].nbytes == 300 * 2  # final_logits_bias [1, 300] fp16
    assert len(set(p.device_map.values())) > 2 and "model.encoder.layers.0" in p.device_map


def test_nested_explicit_entries_only_under_own_tensors():
    m = _tiny_bart()
    kw = dict(gpus="2x1GB", max_memory={0: "1GB", 1: "1GB", "cpu": "1GB", "disk": "1GB"}, workload=WL)
    p = plan_model(m, None, device_map={"": 0, "model.decoder": 1, "lm_head": "cpu"}, **kw)
    check_plan(m, p, tied_together=False)
    assert p.device_map[""] == 0 and p.device_map["model.decoder.layers.2"] == 1 and p.device_map["model.shared"] == 0
    with pytest.raises(PlanError, match="overlap"):
        plan_model(m, None, device_map={"": 0, "model": 1, "model.encoder": 0}, **kw)
    with pytest.raises(PlanError, match="cannot be offloaded"):
        plan_model(m, None, device_map={"": "disk", "model": 0, "lm_head": 0}, **kw)


def test_explicit_map_gpu_outside_max_memory_names_the_budget(models):
    m = models["llama"]
    dm = {"model": 0, "lm_head": 1}
    with pytest.raises(PlanError, match=r"GPU 1, which has no budget in max_memory \[0, 'cpu'\]"):
        plan_model(m, None, device_map=dm, gpus="2x1GB", max_memory={0: "1GB", "cpu": "1GB"}, workload=WL)


def test_gpt2_conv1d_is_quantized_without_warning(models):
    m = models["gpt2"]
    p = plan_model(m, "nf4", max_memory={0: "1GB"}, gpus="1x2GB", workload=WL)
    check_plan(m, p)
    assert {x.quant for x in p.placements if x.name.startswith("transformer.h.")} == {"nf4"}
    assert not p.warnings
    assert not plan_model(models["llama"], "nf4", max_memory={0: "1GB"}, gpus="1x2GB", workload=WL).warnings


def test_no_fit_reports_the_closest_miss():
    """Without a GPU, fp32 embedding + head fit only on the CPU and the layers only on disk, 6.4 MiB short of a
    200 MB cap: the error gives that shortfall, not the 106 MiB overrun of streaming everything from disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=16000)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg).half()
    fwd = {"workload": (1, 128), "kv_cache": False}  # a plain forward: the shortfall pinned is of weights alone
    with pytest.raises(PlanError, match="missing") as info:
        plan_model(m, "nf4", max_memory={"cpu": "200MB", "disk": "50GB"}, **fwd)
    assert 0 < info.value.missing < 10 * 2**20
    ok = plan_model(m, "nf4", max_memory={"cpu": "210MB", "disk": "50GB"}, **fwd)
    assert ok.device_map["model.embed_tokens"] == "cpu" and ok.device_map["model.layers.0"] == "disk"


def test_large_embedding_runs_on_cpu_so_the_head_stays_on_the_gpu():
    """A big untied vocabulary under a small GPU cap: the embedding (a lookup, cheap on the CPU) leaves the GPU
    to the head, which cannot stay resident anywhere else; streaming the head instead would need two head-sized
    slots on the GPU (over the cap: this used to fail)."""
    m = meta_model("llama", hidden=256, layers=8, vocab=32000, tie=False)
    p = plan_model(m, "nf4", gpus="1x1GB", max_memory={0: "30MB", "cpu": "1GB"}, workload=(1, 64))
    check_plan(m, p, tied_together=False)
    assert p.device_map["lm_head"] == 0
    assert p.device_map["model.embed_tokens"] == "cpu" and p.offload_modes["model.embed_tokens"] == "cpu"
    assert p.device_map["model.layers.0"] == 0
    assert p.reserve_detail[0]["stream"] < p.totals[0] // 4  # small slots: only layers stream


def test_no_fit_with_disk_says_what_a_disk_block_costs_the_cpu():
    """Disk is no escape when the CPU cannot hold a disk block's staging buffers (and, without a GPU, its stream
    slots): the error says so with the bytes."""
    m = meta_model("llama", hidden=128, layers=4, vocab=640, tie=False)
    with pytest.raises(PlanError, match=r"a block on disk still needs two staging buffers and two stream slots of "
                                        r"its size in CPU memory \(3\.00 MiB for 'model\.layers\.0'\)"):
        plan_model(m, None, max_memory={"cpu": "600KB", "disk": "1GB"}, workload=(1, 16))


def test_balanced_low_0_leaves_the_first_gpu_what_the_others_cannot_hold():
    """accelerate's "balanced_low_0": the model spread over GPUs 1.., GPU 0 kept free (for generate()'s work)
    when the others hold it all; with one GPU it is "balanced"."""
    m = meta_model("llama", hidden=128, layers=8, vocab=640, tie=False)
    kw = dict(max_memory={0: "1GB", 1: "1GB", 2: "1GB", "cpu": "1GB"}, workload=(1, 16))
    low = plan_model(m, None, gpus="3x1GB", device_map="balanced_low_0", **kw)
    check_plan(m, low, tied_together=False)
    assert low.totals[0] == 0 and low.totals[1] > 0 and low.totals[2] > 0
    assert abs(low.totals[1] - low.totals[2]) < max(low.totals[1], low.totals[2]) // 2
    assert low.execution_device == 0 and low.strategy == "balanced_low_0"
    single = dict(gpus="1x1GB", max_memory={0: "1GB", "cpu": "1GB"}, workload=(1, 16))
    one = plan_model(m, None, device_map="balanced_low_0", **single)
    assert one.device_map == plan_model(m, None, device_map="balanced", **single).device_map


@pytest.mark.parametrize("device_map,where", [(0, 0), ("cuda:1", 1), (torch.device("cuda", 1), 1), ("cpu", "cpu")])
def test_one_device_for_the_whole_model(device_map, where):
    """As transformers takes it: device_map=0, "cuda:1", torch.device or "cpu" puts the whole model there."""
    m = meta_model("llama", hidden=128, layers=4, vocab=640, tie=False)
    p = plan_model(m, None, gpus="2x1GB", max_memory={0: "1GB", 1: "1GB", "cpu": "1GB"}, workload=(1, 16),
                   device_map=device_map)
    assert set(p.device_map.values()) == {where} and p.strategy == "explicit"
    with pytest.raises(PlanError, match="GPU 'cuda:7' does not exist"):
        plan_model(m, None, gpus="2x1GB", max_memory={0: "1GB", 1: "1GB"}, device_map="cuda:7")
