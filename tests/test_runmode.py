"""How "cpu" blocks run (issue #5): the per-block rule of shardq.planning.runmode in the planner and the dispatcher, user
overrides winning, the reason shown in the plan table and on the model, and `model.device`/`model.dtype` of a
dispatched model. CPU only: a GPU is mocked (gpu_count) with the execution device on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardq.runtime.dispatch as dispatch
from _f_models import meta_model
from _f_plan_checks import check_plan
from shardq.config import QuantConfig
from shardq.runtime.dispatch import dispatch_model, remove_dispatch
from shardq.planning.planner import plan_model
from shardq.planning.report import format_plan
from shardq.planning.runmode import BlockKind, RunMode, choose_cpu_run, lookup_width
from test_dispatch import blocks, clone, inputs, tiny

WL = (1, 16)
LAYER = "model.layers.1"


@pytest.fixture
def one_gpu(monkeypatch):
    """The dispatcher believes a GPU is present (streamed blocks still run on the CPU: execution_device='cpu'),
    and the tiny models get a vocabulary larger than the 512 rows of the dispatcher's default workload."""
    import test_dispatch

    monkeypatch.setattr(dispatch, "gpu_count", lambda: 1)
    monkeypatch.setattr(test_dispatch, "VOCAB", 1031)


def test_lookup_width_and_rule():
    assert lookup_width(nn.Embedding(100, 8)) == 8
    assert lookup_width(nn.Sequential(nn.Embedding(100, 8), nn.LayerNorm(8))) == 8  # a norm beside the table
    assert lookup_width(nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 8))) == 0
    assert lookup_width(nn.LayerNorm(8)) == 0
    table = BlockKind(width=64, nbytes=32000 * 64 * 2)
    assert choose_cpu_run(table, has_gpu=True) == "cpu"
    assert choose_cpu_run(table, has_gpu=True, workload=(64, 2048)) == "stream"  # more rows than the table
    tied = BlockKind(64, 32000 * 128, tied_to="lm_head")
    assert choose_cpu_run(tied, has_gpu=True).reason == "lookup tied to lm_head"
    assert choose_cpu_run(BlockKind(0, 10), has_gpu=True) == "stream"
    assert choose_cpu_run(BlockKind(0, 10), has_gpu=True, fp32_cpu_offload=True).reason == "fp32_cpu_offload"
    assert choose_cpu_run(BlockKind(0, 10, nested=True), has_gpu=True) == "cpu"
    assert choose_cpu_run(BlockKind(0, 10), has_gpu=False).reason == "no GPU"
    mode = RunMode("cpu", "why")
    assert mode == "cpu" and hash(mode) == hash("cpu") and {mode: 1}["cpu"] == 1 and repr(mode) == "'cpu'"


def test_planner_picks_per_block_and_overrides_win():
    m = meta_model("llama", hidden=128, layers=4, vocab=640, tie=False)
    everything_cpu = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                      "model.rotary_emb": "cpu", "lm_head": 0}
    kw = dict(device_map=everything_cpu, gpus="1x1GB", max_memory={0: "1GB", "cpu": "1GB"}, workload=WL)
    p = plan_model(m, "nf4", **kw)
    check_plan(m, p, tied_together=False)
    modes = p.offload_modes
    assert modes["model.embed_tokens"] == "cpu" and modes["model.embed_tokens"].reason.startswith("lookup: rows")
    assert modes[LAYER] == "stream" and p.offload_reasons[LAYER] == "computes: on the GPU"
    emb = next(x for x in p.placements if x.name == "model.embed_tokens")
    assert emb.quant == "fp32" and emb.nbytes == 640 * 128 * 4 and p.cpu_mode == "stream"
    assert p.reserve_detail[0]["stream"] == 2 * max(x.nbytes for x in p.placements if x.run == "stream")
    table = format_plan(p)
    assert "why" in table and "lookup: rows" in table and "computes: on the GPU" in table
    assert p.to_dict()["offload_reasons"]["model.embed_tokens"] == modes["model.embed_tokens"].reason
    forced = plan_model(m, "nf4", offload_mode="stream", **kw)
    assert set(forced.offload_modes.values()) == {"stream"}
    assert forced.offload_reasons["model.embed_tokens"] == "forced by offload_mode='stream'"
    fp32 = plan_model(m, QuantConfig(method="nf4", fp32_cpu_offload=True), **kw)
    assert set(fp32.offload_modes.values()) == {"cpu"} and set(fp32.offload_reasons.values()) == {"fp32_cpu_offload"}
    check_plan(m, fp32, tied_together=False)


def test_planner_tied_embedding_streams_with_its_head():
    m = meta_model("llama", hidden=128, layers=2, vocab=640, tie=True)
    p = plan_model(m, None, device_map={"model.embed_tokens": "cpu", "model.layers": 0, "model.norm": 0,
                                          "model.rotary_emb": 0, "lm_head": "cpu"},
                    gpus="1x1GB", max_memory={0: "1GB", "cpu": "1GB"}, workload=WL)
    assert p.offload_reasons["model.embed_tokens"] == "lookup tied to lm_head"
    check_plan(m, p, tied_together=False)


def test_dispatch_rule_with_a_gpu(one_gpu):
    model = tiny("llama", tie=False)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, execution_device="cpu")
    modes = model.shardq_offload_modes
    assert modes["model.embed_tokens"] == "cpu" and modes["model.embed_tokens"].reason.startswith("lookup")
    assert modes[LAYER] == "stream" and modes["lm_head"] == "stream" and modes[LAYER].reason == "computes: on the GPU"


def test_dispatch_streams_a_table_smaller_than_its_rows(monkeypatch):
    monkeypatch.setattr(dispatch, "gpu_count", lambda: 1)
    model = tiny("llama", tie=False)  # 211 rows < 512 tokens of the default workload
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, execution_device="cpu")
    assert model.shardq_offload_modes["model.embed_tokens"] == "stream"
    assert model.shardq_offload_modes["model.embed_tokens"].reason.startswith("lookup: rows")


def test_dispatch_overrides_win(one_gpu):
    model = tiny("llama", tie=False)
    names = blocks(model)
    dispatch_model(model, {n: "cpu" for n in names}, execution_device="cpu",
                   offload_modes={"model.embed_tokens": "stream", "lm_head": "cpu"})
    modes = model.shardq_offload_modes
    assert modes["model.embed_tokens"] == "stream" and modes["lm_head"] == "cpu" and modes[LAYER] == "stream"
    assert modes["lm_head"].reason == "forced by offload_modes['lm_head']"
    every = tiny("llama", tie=False)
    dispatch_model(every, {n: "cpu" for n in names}, execution_device="cpu", offload_modes="stream")
    assert set(every.shardq_offload_modes.values()) == {"stream"}
    assert every.shardq_offload_modes["model.embed_tokens"].reason == "forced by offload_modes='stream'"


def test_dispatch_without_gpu_runs_everything_on_cpu():
    model = tiny("opt", tie=False)
    dispatch_model(model, {n: "cpu" for n in blocks(model)})
    assert {m.reason for m in model.shardq_offload_modes.values()} == {"no GPU"}


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "t5"])
def test_rule_chosen_mixed_modes_match_unsharded(arch, one_gpu, tmp_path):
    ref = tiny(arch, tie=False)
    model = clone(ref)
    names = blocks(model)
    dmap = {n: "disk" if i == len(names) // 2 else "cpu" for i, n in enumerate(names)}
    dispatch_model(model, dmap, execution_device="cpu", offload_dir=tmp_path, offload_modes={"lm_head": "cpu"})
    modes = model.shardq_offload_modes
    assert {"cpu", "stream", "disk"} <= set(modes.values()) and modes["lm_head"] == "cpu"
    emb = model.get_input_embeddings()
    name = next(n for n in names if model.get_submodule(n) is emb)
    assert modes[name] == ("stream" if arch == "t5" else "cpu")  # T5's shared table is tied to its head
    kw = inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, ref(**kw).logits, rtol=0, atol=0)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    kw.pop("decoder_input_ids", None)
    assert torch.equal(model.generate(**kw, **gen), ref.generate(**kw, **gen))


def test_model_device_and_dtype_report_the_main_device(monkeypatch):
    """The mechanism of `model.device` on a GPU, on the CPU: the main device is mocked as cuda:0 (nothing runs)."""
    model = tiny("llama", tie=False).half()
    cls = type(model)
    monkeypatch.setattr(dispatch, "_main_device", lambda *a, **k: torch.device("cuda", 0))
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="cpu")
    assert model.model.embed_tokens.weight.dtype == torch.float32  # computed on the CPU in fp32
    assert model.device == torch.device("cuda", 0) and model.dtype == torch.float16
    assert isinstance(model, cls) and type(model).__name__ == cls.__name__ and type(model) is not cls
    remove_dispatch(model)
    assert type(model) is cls and model.device == torch.device("cpu") and model.dtype == torch.float32


def test_model_device_on_cpu_with_first_block_offloaded():
    model = tiny("llama", tie=False).half()
    names = blocks(model)
    dispatch_model(model, {n: "cpu" for n in names})
    assert model.device == torch.device("cpu") and model.dtype == torch.float16
    plain = nn.Sequential(nn.Linear(4, 4))
    dispatch_model(plain, {"0": "cpu"})
    assert type(plain) is nn.Sequential and not hasattr(plain, "device")


def test_loader_keeps_the_plans_reasons(tmp_path):
    from _f_models import save_checkpoint
    from shardq.loading.loader import load_sharded_from_dir

    ckpt = save_checkpoint("llama", tmp_path / "ckpt", dtype=torch.float16, tie=False)
    model = load_sharded_from_dir(ckpt, max_memory={"cpu": "1GB"}, device_map={"": "cpu"}, offload_mode="cpu",
                                  progress=False)
    modes = model.shardq_offload_modes
    assert set(modes.values()) == {"cpu"} and {m.reason for m in modes.values()} == {"forced by offload_mode='cpu'"}
    assert {k: m.reason for k, m in modes.items()} == model.shardq_plan.offload_reasons
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.dtype == torch.float32  # no GPU: all fp32


def test_working_dtype_of_weights_upcast_for_the_cpu():
    """As the loader leaves them with a GPU: "cpu" blocks already in fp32, the GPU blocks in fp16; `dtype` makes
    an embedding computed on the CPU hand fp16 rows on, and `model.dtype` say fp16."""
    model = tiny("llama", tie=False)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="cpu", dtype=torch.float16)
    ids = inputs("llama")["input_ids"]
    assert model.dtype == torch.float16 and model.model.embed_tokens(ids).dtype == torch.float16
    hidden = torch.randn(2, 9, 64, dtype=torch.float16)
    assert model.model.norm(hidden).dtype == torch.float16  # blocks fed floats return their input's dtype
