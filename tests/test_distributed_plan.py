"""The multi-rank plan, stage stubs, the `--ranks` preview, micro-batch slicing and the cost model (no processes)."""

from __future__ import annotations

import pytest
import torch
from _f_models import meta_model, save_checkpoint
from transformers import DynamicCache

from shardq.cli import main
from shardq.distributed.cost import (
    BlockTime,
    Link,
    pipeline_seconds,
    predict,
    roofline_time,
)
from shardq.distributed.pipeline import Sessions, micro_ranges, slice_batch
from shardq.distributed.preview import parse_ranks
from shardq.distributed.stages import cut, plan_ranks, split_model, stage_model
from shardq.distributed.stubs import StageStub
from shardq.memory import GPU_MARGIN
from shardq.planning.placement import PlanError

GB = 10**9


def test_cut_follows_shares_and_gives_every_rank_a_block():
    assert cut([1] * 8, [1, 1]) == [4, 4]
    assert cut([1] * 8, [3, 1]) == [6, 2]
    assert cut([1] * 8, [1, 1], head=4) == [2, 6]  # rank 0's embedding counts against its share
    assert cut([1] * 3, [1, 1, 100]) == [1, 1, 1]
    with pytest.raises(PlanError, match="3 blocks but 4 ranks"):
        cut([1] * 3, [1] * 4)


def test_split_model_stages_and_extras():
    model = meta_model("llama", dtype=torch.float32, layers=6, tie=True)
    rp = split_model(model, [{"cpu": GB}] * 3)
    assert [s.blocks for s in rp.stages] == [[f"model.layers.{i}" for i in r] for r in ((0, 1), (2, 3), (4, 5))]
    assert rp.stages[0].extra == ["model.embed_tokens"]
    assert rp.stages[1].extra == []
    assert set(rp.stages[2].extra) == {"model.embed_tokens", "model.norm", "lm_head"}  # the tied head's weight
    assert rp.replicated == ["model.rotary_emb"]
    assert rp.link_bytes_per_token == 64 * 4 and rp.logits_bytes_per_token == 512 * 4


def test_split_model_refuses_bad_requests():
    model = meta_model("llama", dtype=torch.float32, layers=4)
    with pytest.raises(PlanError, match="at least 2 ranks"):
        split_model(model, [{"cpu": GB}])
    with pytest.raises(PlanError, match=r"stages=\[3, 3\] must give one block count"):
        split_model(model, [{"cpu": GB}] * 2, stages=[3, 3])
    with pytest.raises(PlanError, match="encoder-decoder"):
        split_model(meta_model("t5", dtype=torch.float32), [{"cpu": GB}] * 2)
    assert [len(s.blocks) for s in split_model(model, [{"cpu": GB}] * 2, stages=[1, 3]).stages] == [1, 3]


def test_stage_model_stubs_what_the_rank_does_not_hold():
    model = meta_model("llama", dtype=torch.float32, layers=4)
    rp = split_model(model, [{"cpu": GB}] * 2)
    stage_model(model, rp, 1)
    assert isinstance(model.model.embed_tokens, StageStub) and isinstance(model.model.layers[1], StageStub)
    assert model.model.layers[1].layer_idx == 1 and model.model.embed_tokens.layer_idx is None
    assert not isinstance(model.model.layers[2], StageStub) and not isinstance(model.lm_head, StageStub)
    assert not any(True for _ in model.model.layers[0].parameters())
    ignore = model._keys_to_ignore_on_load_unexpected
    assert any(__import__("re").search(p, "model.layers.1.mlp.up_proj.weight") for p in ignore)
    assert not any(__import__("re").search(p, "model.layers.2.mlp.up_proj.weight") for p in ignore)


def test_stub_passes_hidden_states_through_and_keeps_the_cache_length():
    stub = StageStub("model.layers.0", 0)
    cache = DynamicCache()
    h = torch.randn(2, 5, 8)
    assert stub(h, cache=cache) is h
    assert cache.get_seq_length() == 5
    stub(torch.randn(2, 1, 8), cache=cache)
    assert cache.get_seq_length() == 6


def test_plan_ranks_places_each_stage_and_names_a_rank_that_does_not_fit():
    model = meta_model("llama", dtype=torch.float32, layers=4)
    rp = plan_ranks(model, [{0: GB}, {0: GB}], "nf4")
    assert all(s.plan is not None and set(s.plan.device_map.values()) == {0} for s in rp.stages)
    assert set(rp.stages[1].plan.device_map) >= {"model.layers.3", "lm_head"}  # the head weighs about a layer
    with pytest.raises(PlanError, match=r"rank 1 \(blocks model.layers.2 .. model.layers.3\)"):
        plan_ranks(model, [{"cpu": GB}, {"cpu": 1000}], stages=[2, 2])


def test_parse_ranks():
    assert parse_ranks("2x(1x24GB)") == [{0: 24 * GB - GPU_MARGIN}] * 2
    assert parse_ranks("(2x16GB);(cpu=8GB)", {"disk": "1TB"}) == [
        {0: 16 * GB - GPU_MARGIN, 1: 16 * GB - GPU_MARGIN, "disk": 10**12}, {"cpu": 8 * GB, "disk": 10**12}]
    with pytest.raises(ValueError, match="COUNTx"):
        parse_ranks("2x1x24GB")


def test_cli_ranks_preview(tmp_path, capsys):
    path = save_checkpoint("llama", tmp_path / "m", layers=4)
    assert main([str(path), "--ranks", "2x(1x24GB)", "--quant", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "rank 0: 3 blocks (model.layers.0 .. model.layers.2) + model.embed_tokens" in out  # embedding: no work
    assert "rank 1: 1 blocks (model.layers.3) + model.norm, lm_head" in out
    assert "link rank 0 -> 1: 128 B per token" in out  # fp16 hidden states of width 64
    assert main([str(path), "--ranks", "(1x24GB"]) == 2


def test_micro_ranges_and_slicing():
    assert micro_ranges(5, 2) == [(0, 3), (3, 5)]
    assert micro_ranges(2, 8) == [(0, 1), (1, 2)]
    kw = {"input_ids": torch.arange(8).view(4, 2), "position_ids": torch.arange(2).view(1, 2), "use_cache": True,
          "attention_mask": torch.ones(4, 3)}
    part = slice_batch(kw, 1, 3, 4)
    assert part["input_ids"].tolist() == [[2, 3], [4, 5]] and part["attention_mask"].shape == (2, 3)
    assert part["position_ids"] is kw["position_ids"] and part["use_cache"] is True


def test_sessions_keep_the_latest_and_refuse_a_dropped_one():
    s = Sessions(DynamicCache)
    users = [DynamicCache() for _ in range(6)]
    ids = [s.id_for(u) for u in users]
    assert ids == list(range(6)) and s.id_for(users[0]) == 0
    for sid in ids:
        s.get(sid, 0).update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 0)
    assert list(s.caches) == ids[2:]
    users[0].update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 0)
    with pytest.raises(RuntimeError, match="dropped"):
        s.id_for(users[0])


def test_pipeline_formula_and_prediction():
    assert pipeline_seconds([1, 1], [0, 0], 1) == 2
    assert pipeline_seconds([1, 1], [0, 0], 8) == 9  # fill + 7 paced by a 1 s stage
    assert pipeline_seconds([2, 1], [0.5, 0], 4) == 3.5 + 3 * 2
    assert pipeline_seconds([1, 1, 1], [0, 0, 0], 4, processors=[0, 1, 0]) == 3 + 3 * 2  # 3 ranks on 2 cores
    model = meta_model("llama", dtype=torch.float32, layers=4)
    rp = split_model(model, [{"cpu": GB}] * 2)
    times = {f"model.layers.{i}": BlockTime(0.001, 1e-4) for i in range(4)}
    link = Link(gbps=1.0, latency=1e-5)
    one = predict(rp, times, [link, link], batch=8, tokens=16, micro_batches=1)
    eight = predict(rp, times, [link, link], batch=8, tokens=16, micro_batches=8)
    assert one.stage_seconds == pytest.approx([2 * (0.001 + 1e-4 * 128)] * 2)
    assert eight.stage_seconds == pytest.approx([2 * (0.001 + 1e-4 * 16)] * 2)
    assert eight.seconds == pytest.approx(sum(eight.stage_seconds + eight.link_seconds) + 7 * eight.stage_seconds[0])
    assert eight.seconds < one.seconds
    with pytest.raises(ValueError, match="give 2 links"):
        predict(rp, times, [link], batch=1, tokens=1)


def test_block_time_fit_and_roofline():
    t = BlockTime.fit(1, 0.002, 101, 0.012)
    assert t(1) == pytest.approx(0.002) and t(51) == pytest.approx(0.007)
    r = roofline_time(params=10**9, nbytes=5 * 10**8, mem_gbps=2000, tflops=400)
    assert r(1) == pytest.approx(2.5e-4)  # weight reads bound one token
    assert r(4096) == pytest.approx(2 * 10**9 * 4096 / 400e12)  # compute bounds a long prompt
