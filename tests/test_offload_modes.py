"""Per-block forced run modes (issue #5): `offload_mode` as a dict {block or parent module name: "cpu"|"stream"}
through the planner, the CLI and `load_sharded`, the reasons in the plan and on the model, outputs equal to the
unsharded model, and every bad input refused before anything is placed. CPU only: where a GPU is needed for
"stream", it is mocked and streamed blocks run on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import shardq.runtime.dispatch as dispatch
import shardq.loading.loader as loader
import shardq.memory as memory
from _f_models import meta_model, save_checkpoint
from _f_plan_checks import check_plan
from shardq.cli import main
from shardq.hf import meta_model_from_dir
from shardq.loading.loader import load_sharded
from shardq.planning.planner import PlanError, plan_model
from shardq.planning.report import format_plan

WL = (1, 16)
ALL_CPU = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
           "lm_head": "cpu"}
MIXED = {"model.layers": "cpu", "model.layers.2": "stream", "model.embed_tokens": "stream"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint("llama", tmp_path_factory.mktemp("modes") / "llama", dtype=torch.float32, tie=False)


def all_meta(model: torch.nn.Module) -> bool:
    return all(t.device.type == "meta" for t in model.state_dict().values())


def test_plan_dict_exact_names_and_prefixes():
    m = meta_model("llama", hidden=128, layers=4, vocab=640, tie=False)
    p = plan_model(m, "nf4", device_map={**ALL_CPU, "lm_head": 0}, gpus="1x1GB", max_memory={0: "1GB", "cpu": "1GB"},
                   workload=WL, offload_mode=MIXED)
    check_plan(m, p, tied_together=False)
    modes, why = p.offload_modes, p.offload_reasons
    assert [modes[f"model.layers.{i}"] for i in range(4)] == ["cpu", "cpu", "stream", "cpu"]
    assert why["model.layers.3"] == "forced by offload_mode['model.layers']"  # the parent's name
    assert why["model.layers.2"] == "forced by offload_mode['model.layers.2']"  # the longest name wins
    assert modes["model.embed_tokens"] == "stream" and why["model.norm"] == "computes: on the GPU"  # not named
    assert {x.name: x.quant for x in p.placements}["model.layers.0"] == "fp32"  # "cpu" blocks are held in fp32
    table = format_plan(p)
    assert "forced by offload_mode['model.layers']" in table and "forced by offload_mode['model.layers.2']" in table
    d = json.loads(p.to_json())
    assert d["offload_mode"] == MIXED and d["offload_reasons"]["model.layers.2"] == why["model.layers.2"]


def test_plan_prefix_over_gpu_and_cpu_blocks_forces_only_the_cpu_ones():
    """max_memory puts model.layers.0 on the GPU and the other layers on the CPU: 'model.layers' forces those."""
    m = meta_model("llama", hidden=128, layers=4, vocab=640, tie=False)
    kw = dict(gpus="1x1GB", max_memory={0: "1.5MB", "cpu": "1GB"}, workload=WL, device_map="sequential")
    p = plan_model(m, None, offload_mode={"model.layers": "cpu", "model.layers.3": "stream"}, **kw)
    check_plan(m, p, tied_together=False)
    assert p.device_map["model.layers.0"] == 0 and p.offload_modes["model.layers.1"] == "cpu"
    assert p.offload_modes["model.layers.3"] == "stream" and p.offload_modes["lm_head"] == "stream"
    assert p.offload_reasons["model.layers.1"] == "forced by offload_mode['model.layers']"
    roomy = dict(kw, max_memory={0: "1GB", "cpu": "1GB"})  # everything fits on the GPU
    with pytest.raises(PlanError, match=r"'model.layers.0', but the plan puts its block\(s\) on GPU 0, not on 'cpu'"):
        plan_model(m, None, offload_mode={"model.layers.0": "cpu"}, **roomy)


@pytest.mark.parametrize("offload_mode,match", [
    ({"model.layer": "cpu"}, r"offload_mode key 'model.layer' is not a module of this model. Did you mean"),
    ({"lm_head.weight": "cpu"}, r"names a tensor, not a module: name its module 'lm_head'"),
    ({"model.layers.1": "gpu"}, r"offload_mode\['model.layers.1'\]='gpu' is unknown: use 'cpu'"),
    ({1: "cpu"}, r"key 1 must be a module name"),
    (["cpu"], r"offload_mode must be None, 'cpu', 'stream' or a dict"),
    ("fast", r"offload_mode='fast' is unknown"),
    ({"model.layers.1.mlp": "cpu"}, r"inside block 'model.layers.1': a mode applies to whole blocks"),
    ({"lm_head": "stream"}, r"'lm_head', but the plan puts its block\(s\) on GPU 0"),
])
def test_plan_rejects_bad_offload_modes(offload_mode, match):
    m = meta_model("llama", hidden=128, layers=4, vocab=640, tie=False)
    with pytest.raises(PlanError, match=match):
        plan_model(m, None, device_map={**ALL_CPU, "lm_head": 0}, gpus="1x1GB", max_memory={0: "1GB", "cpu": "1GB"},
                   workload=WL, offload_mode=offload_mode)


def test_plan_stream_needs_a_gpu():
    m = meta_model("llama", hidden=128, layers=2, vocab=640, tie=False)
    with pytest.raises(PlanError, match=r"offload_mode\['model.layers'\]='stream' needs a GPU"):
        plan_model(m, None, max_memory={"cpu": "1GB"}, offload_mode={"model.layers": "stream"})


def test_cli_offload_mode_for(tmp_path, capsys):
    path = save_checkpoint("llama", tmp_path / "cli", hidden=64, layers=3, vocab=300, tie=False)
    rc = main([str(path), "--gpus", "1x1GB", "--max-memory", "0=1GB,cpu=1GB", "--json", "--device-map",
               json.dumps({**ALL_CPU, "lm_head": 0}), "--offload-mode", "stream",
               "--offload-mode-for", "model.layers.1=cpu"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["offload_mode"] == {"": "stream", "model.layers.1": "cpu"}
    assert d["offload_modes"]["model.layers.1"] == "cpu" and d["offload_modes"]["model.layers.0"] == "stream"
    assert d["offload_reasons"]["model.layers.0"] == "forced by offload_mode['']"
    rc = main([str(path), "--max-memory", "cpu=1GB", "--offload-mode-for", "model.layers"])
    assert rc == 2 and "is not NAME=MODE" in capsys.readouterr().err


def test_load_sharded_dict_without_gpu_keeps_the_plans_reasons(ckpt):
    model = load_sharded(meta_model_from_dir(ckpt), ckpt, max_memory={"cpu": "1GB"},
                         offload_mode={"model.layers.1": "cpu"}, progress=False)
    modes = model.shardq_offload_modes
    assert modes["model.layers.1"].reason == "forced by offload_mode['model.layers.1']"
    assert modes["model.layers.0"].reason == "no GPU" and set(modes.values()) == {"cpu"}
    assert {k: m.reason for k, m in modes.items()} == model.shardq_plan.offload_reasons
    assert model.shardq_plan.offload_mode == {"model.layers.1": "cpu"}


def test_load_sharded_mixed_forced_modes_match_unsharded(ckpt, monkeypatch):
    """A mocked GPU lets the plan stream; the dispatcher runs streamed blocks on the CPU (execution_device)."""
    real = loader.dispatch_model
    monkeypatch.setattr(memory, "gpu_count", lambda: 1)
    monkeypatch.setattr(dispatch, "gpu_count", lambda: 1)
    monkeypatch.setattr(loader, "dispatch_model", lambda *a, **k: real(*a, **{**k, "execution_device": "cpu"}))
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    model = load_sharded(meta_model_from_dir(ckpt), ckpt, max_memory={0: "1GB", "cpu": "1GB"}, device_map=ALL_CPU,
                         offload_mode={**MIXED, "lm_head": "cpu"}, progress=False)
    modes, plan = model.shardq_offload_modes, model.shardq_plan
    assert {k: (str(m), m.reason) for k, m in modes.items()} == \
        {p.name: (p.run, p.reason) for p in plan.placements}
    assert modes["model.layers.2"] == "stream" and modes["model.layers.1"] == "cpu" and modes["lm_head"] == "cpu"
    assert modes["model.embed_tokens"] == "stream" and modes["model.norm"].reason == "computes: on the GPU"
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offload_mode,where,match", [
    ({"model.nope": "cpu"}, "early", "not a module of this model"),
    ({"model.layers.0": "sometimes"}, "early", "'sometimes' is unknown"),
    ({"model.layers.0": "cpu"}, "planned", r"puts its block\(s\) on disk, not on 'cpu'"),
    ({"model.layers.1": "stream"}, "planned", "needs a GPU"),
])
def test_load_sharded_bad_offload_mode_leaves_nothing_behind(ckpt, tmp_path, monkeypatch, offload_mode, where,
                                                             match):
    if where == "early":
        monkeypatch.setattr(loader, "open_source", lambda *a: pytest.fail("checked before the checkpoint is read"))
    model = meta_model_from_dir(ckpt)
    before = [type(m) for m in model.modules()]
    dmap = {**ALL_CPU, "model.layers.0": "disk", **{f"model.layers.{i}": "cpu" for i in (1, 2, 3)}}
    del dmap["model.layers"]
    with pytest.raises(PlanError, match=match):
        load_sharded(model, ckpt, max_memory={"cpu": "1GB", "disk": "1GB"}, device_map=dmap,
                     offload_dir=tmp_path / "off", offload_mode=offload_mode, progress=False)
    assert all_meta(model) and [type(m) for m in model.modules()] == before and not hasattr(model, "shardq_runtime")
    assert not (tmp_path / "off").exists()
