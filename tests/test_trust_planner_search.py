"""The planner finds a plan whenever one fits: compared with a brute-force search over every placement (each
unit on each device; a CPU block streamed or computed there) on small models and many random budgets, under the
planner's own cost model (bytes as placed + reserves, `_within_budgets`)."""

from __future__ import annotations

import itertools
import os
import random
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from _f_models import meta_model  # noqa: E402
from _f_plan_checks import check_plan  # noqa: E402

from shardq import hf  # noqa: E402
from shardq.config import QuantConfig  # noqa: E402
from shardq.memory import get_max_memory  # noqa: E402
from shardq.planning import planner  # noqa: E402
from shardq.planning.reserves import check_kv_cache  # noqa: E402
from shardq.planning.runmode import RunMode  # noqa: E402
from shardq.planning.units import tied_groups  # noqa: E402
from shardq.quant import sizing  # noqa: E402


def _context(model, q: QuantConfig, caps: dict, workload, n_gpus: int):
    budgets = get_max_memory(caps, gpus=[10**12] * n_gpus)
    entries = sizing.tensor_entries(model, q)
    modes = (check_kv_cache(model, None, None), None)  # plan_model's default reserves: a causal LM's KV cache
    return planner._context(model, q, budgets, entries, set(hf.no_split_modules(model)), workload, None, modes)


def brute_force(model, quant, caps: dict, workload, n_gpus: int) -> dict | None:
    """Some placement within every budget, trying all of them (the first GPU with a budget runs streamed blocks,
    as the planner's first choice; other choices of the execution GPU are the planner's to find too)."""
    q = QuantConfig.from_any(quant)
    ctx = _context(model, q, caps, workload, n_gpus)
    rule = dict(ctx.runs)
    gpus = [d for d in ctx.gpus if ctx.budgets[d] > 0]
    for exec_dev in gpus or [None]:
        ctx.exec_dev = exec_dev
        opts = []
        for u in ctx.units:
            o = [(d, None) for d in gpus]
            if "cpu" in ctx.budgets:
                o.append(("cpu", rule[u.name]))
                if rule[u.name] == "stream":
                    o.append(("cpu", RunMode("cpu", "brute force")))
            if "disk" in ctx.budgets and not u.own_only:
                o.append(("disk", None))
            opts.append(o)
        partner = {u.name: g[0].name for g in tied_groups(ctx.units) for u in g}
        for combo in itertools.product(*opts):
            assign = {u.name: d for u, (d, _) in zip(ctx.units, combo)}
            if any(assign[partner[n]] != d for n, d in assign.items()):
                continue  # tied tensors are stored once, their units together
            ctx.runs = {u.name: r if r is not None else rule[u.name] for u, (_, r) in zip(ctx.units, combo)}
            if planner._within_budgets(ctx, assign):
                return assign
    return None


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "bloom"])
def test_planner_plans_whenever_brute_force_finds_a_placement(arch):
    model = meta_model(arch, hidden=64, layers=2, vocab=512)
    size = planner.plan_model(model, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=(1, 8)).totals[0]
    rng = random.Random(7 + len(arch))
    outcomes = {True: 0, False: 0}
    for _ in range(70):
        quant = rng.choice([None, "int8", "nf4"])
        caps = {0: int(size * rng.uniform(0.0, 2.0))}
        if rng.random() < 0.8:
            caps["cpu"] = int(size * rng.uniform(0.05, 3.0))
        if rng.random() < 0.5:
            caps["disk"] = int(size * rng.uniform(0.1, 2))
        workload = (1, rng.choice([8, 64]))
        fits = brute_force(model, quant, caps, workload, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                p = planner.plan_model(model, quant, max_memory=caps, gpus=[10**12], workload=workload)
            except planner.PlanError as e:
                assert fits is None, f"refused although {fits} fits under {caps} ({quant}, {workload}): {e}"
                outcomes[False] += 1
                continue
        assert fits is not None, f"planned {p.device_map} although nothing fits under {caps}"
        check_plan(model, p)
        outcomes[True] += 1
    assert outcomes[True] >= 10 and outcomes[False] >= 5, outcomes  # both sides exercised


def test_two_gpus_against_brute_force():
    model = meta_model("llama", hidden=64, layers=2, vocab=512)
    size = planner.plan_model(model, None, max_memory={0: "1GB"}, gpus="1x2GB", workload=(1, 8)).totals[0]
    rng = random.Random(3)
    for _ in range(12):
        caps = {0: int(size * rng.uniform(0.0, 0.7)), 1: int(size * rng.uniform(0.0, 0.7)),
                "cpu": int(size * rng.uniform(0.05, 1.2))}
        fits = brute_force(model, "int8", caps, (1, 8), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                planner.plan_model(model, "int8", max_memory=caps, gpus=[10**12] * 2, workload=(1, 8))
                assert fits is not None
            except planner.PlanError:
                assert fits is None, (caps, fits)


def test_llama_1b_under_300mb_plans_with_every_layer_streamed():
    """The issue's case: refused before although streaming every layer (and computing the head on the CPU) fits."""
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                   tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.float16)
    p = planner.plan_model(model, "nf4", max_memory={0: "300MB", "cpu": "60GB"}, gpus="1x80GB")
    assert p.totals[0] + p.reserves[0] <= p.budgets[0]
    assert p.offload_modes["lm_head"] == "cpu" and "streaming" in p.offload_modes["lm_head"].reason
    assert all(p.device_map[f"model.layers.{i}"] in (0, "cpu") for i in range(16))
    check_plan(model, p)


def _least_extra_brute(model, quant, caps: dict, workload, device) -> int | None:
    """The least extra bytes on `device` alone with which some placement fits (brute force)."""
    q = QuantConfig.from_any(quant)
    best = None
    ctx = _context(model, q, {**caps, device: 10**12}, workload, 1)
    ctx.budgets[device] = caps[device]  # the real budget, with the execution GPU chosen as if it had room
    rule = dict(ctx.runs)
    opts = []
    for u in ctx.units:
        o = [(d, None) for d in ctx.budgets if not isinstance(d, int) or ctx.budgets[d] > 0 or d == device]
        o = [(d, r) for d, r in o if d not in ("cpu", "disk")]
        if "cpu" in ctx.budgets:
            o.append(("cpu", rule[u.name]))
            if rule[u.name] == "stream":
                o.append(("cpu", RunMode("cpu", "brute force")))
        if "disk" in ctx.budgets and not u.own_only:
            o.append(("disk", None))
        opts.append(o)
    for combo in itertools.product(*opts):
        assign = {u.name: d for u, (d, _) in zip(ctx.units, combo)}
        ctx.runs = {u.name: r if r is not None else rule[u.name] for u, (_, r) in zip(ctx.units, combo)}
        need = planner._needs(ctx, assign)
        over = {}
        for d in ctx.budgets:
            here = [u for u in ctx.units if assign[u.name] == d]
            over[d] = planner._bytes(ctx, here, d) + sum(planner._reserve(ctx, d, here, need).values()) \
                - ctx.budgets[d]
        if all(v <= 0 for d, v in over.items() if d != device):
            extra = max(0, over[device])
            best = extra if best is None else min(best, extra)
    return best


@pytest.mark.parametrize("quant,caps", [
    (None, {0: 120_000, "cpu": 60_000}),
    ("int8", {0: 90_000, "cpu": 40_000}),
    ("nf4", {0: 60_000, "cpu": 30_000, "disk": 50_000}),
])
def test_missing_bytes_are_the_least_that_make_it_fit(quant, caps):
    model = meta_model("llama", hidden=64, layers=2, vocab=512)
    with pytest.raises(planner.PlanError) as err:
        planner.plan_model(model, quant, max_memory=caps, gpus=[10**12], workload=(1, 8))
    got = {s.device: s for s in err.value.shortfalls}
    assert got[0].exact and err.value.missing == min(s.extra for s in got.values())
    assert f"{got[0].extra} bytes) more on GPU 0" in str(err.value)
    want = _least_extra_brute(model, quant, caps, (1, 8), 0)
    assert got[0].extra == want
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planner.plan_model(model, quant, max_memory={**caps, 0: caps[0] + want}, gpus=[10**12], workload=(1, 8))
        with pytest.raises(planner.PlanError):
            planner.plan_model(model, quant, max_memory={**caps, 0: caps[0] + want - 1}, gpus=[10**12],
                               workload=(1, 8))


def test_7b_fp16_under_8gb_reports_gibs_missing_and_raising_the_cap_shrinks_it():
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.float16)
    figures = []
    for gpu in ("8GB", "8.1GB"):
        with pytest.raises(planner.PlanError) as err:
            planner.plan_model(model, None, max_memory={0: gpu, "cpu": "2GB"}, gpus="1x80GB")
        figures.append({s.device: s.extra for s in err.value.shortfalls})
    assert figures[0][0] > 3 * 2**30  # GiBs, not the 32 MiB of the block that stopped the fill
    assert figures[1][0] < figures[0][0]
    p = planner.plan_model(model, None, max_memory={0: 8 * 10**9 + figures[0][0], "cpu": "2GB"}, gpus="1x80GB")
    assert p.totals[0] + p.reserves[0] <= p.budgets[0]
