"""Pipeline stages over torch.distributed on the CPU (gloo, 2 and 3 processes spawned here): logits equal to one
process, greedy generate() token-equal, micro-batches, quantized and offloaded stages, errors reaching rank 0."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from _f_dist import run_ranks
from _f_models import save_checkpoint

import shardq
from shardq.distributed import Pipeline

CFG = {"llama": {"layers": 4}, "gpt_neox": {"layers": 6}}


def _save(arch: str, path: Path) -> Path:
    if arch == "gpt_neox":
        torch.manual_seed(0)
        cfg = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                         num_attention_heads=4, vocab_size=512, max_position_embeddings=256)
        cfg.architectures = ["GPTNeoXForCausalLM"]
        model = transformers.GPTNeoXForCausalLM(cfg).eval()
        model.save_pretrained(path)
        return path
    return save_checkpoint(arch, path, dtype=torch.float32, shards=2, **CFG[arch])


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 500, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _single(path: Path, quant: str | None) -> torch.nn.Module:
    return shardq.load_sharded_from_dir(path, max_memory={"cpu": "1GB"}, quant=quant, progress=False)


def _job(rank: int, world: int, path: str, quant: str | None, micro: int, caps: list | None, offload: str | None,
         stages: list[int] | None = None, maps: list | None = None):
    kw = _inputs()
    gen = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    model = shardq.meta_model_from_dir(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = shardq.load_sharded(model, path, max_memory=caps or {"cpu": "1GB"}, quant=quant, progress=False,
                                    offload_dir=offload and f"{offload}/rank{rank}", workload=(4, 16),
                                    device_map=maps or "auto",
                                    distributed=Pipeline(micro_batches=micro, stages=stages, exit_workers=False,
                                                         timeout_s=20))
    pipe = model.shardq_pipeline
    if rank > 0:
        pipe.serve()
        return {"modes": {k: str(v) for k, v in model.shardq_offload_modes.items()}}
    with torch.no_grad():
        logits = model(**kw).logits
        logits1 = model(**{k: v[:1] for k, v in kw.items()}).logits
        tokens = model.generate(**kw, **gen)
    pipe.shutdown()
    ref = _single(Path(path), quant)
    with torch.no_grad():
        want = ref(**kw).logits
        want_tokens = ref.generate(**kw, **gen)
    return {"logits": (logits, want), "logits1": (logits1, want[:1]), "tokens": (tokens, want_tokens),
            "stages": [s.blocks for s in model.shardq_rank_plan.stages]}


def _check(results, world: int) -> dict:
    for r, (status, value) in enumerate(results):
        assert status == "ok", f"rank {r}: {value}"
    out = results[0][1]
    got, want = out["logits"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(*out["logits1"], rtol=0, atol=0)
    assert torch.equal(*out["tokens"])
    assert len(out["stages"]) == world and all(out["stages"])
    return out


@pytest.mark.parametrize("arch,world,micro,quant", [("llama", 2, 2, None), ("gpt_neox", 3, 4, None),
                                                    ("gpt_neox", 2, 3, "int8")])
def test_logits_and_generate_equal_one_process(tmp_path, arch, world, micro, quant):
    """fp32 logits exactly equal to one process (int8: to the same quantization loaded in one process), greedy
    tokens equal; a batch of 4 in `micro` micro-batches, and a batch of 1."""
    path = _save(arch, tmp_path / arch)
    _check(run_ranks(_job, world, str(path), quant, micro, None, None), world)


def test_nf4_stage_with_cpu_and_disk_blocks_equals_one_process(tmp_path):
    """Rank 1's stage holds one block on the CPU and one in its offload folder (its own explicit map); logits equal
    the same nf4 quantization loaded in one process, tokens equal."""
    path = _save("llama", tmp_path / "llama")
    rank1 = {"model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu",
             "model.rotary_emb": "cpu"}
    caps = [{"cpu": "1GB"}, {"cpu": "2MB", "disk": "1GB"}]
    res = run_ranks(_job, 2, str(path), "nf4", 2, caps, str(tmp_path / "offload"), [2, 2], ["auto", rank1])
    _check(res, 2)
    modes = res[1][1]["modes"]
    assert "disk" in modes.values() and "cpu" in modes.values(), modes
    assert not any(k.startswith(("model.layers.0", "model.layers.1", "model.embed")) for k in modes), modes


def _failing_job(rank: int, world: int, path: str, how: str):
    model = shardq.meta_model_from_dir(path)
    model = shardq.load_sharded(model, path, max_memory={"cpu": "1GB"}, progress=False,
                                distributed=Pipeline(micro_batches=2, exit_workers=False, timeout_s=10))
    stage = model.shardq_rank_plan.stages[rank]
    calls = {"n": 0}

    def fail(module, args):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-forward: the second micro-batch of the second forward
            if how == "exit":
                os._exit(7)
            raise RuntimeError(f"injected failure in {stage.blocks[0]}")

    if rank == 1:
        model.get_submodule(stage.blocks[0]).register_forward_pre_hook(fail)
    if rank > 0:
        model.shardq_pipeline.serve()
        return "served"
    kw = _inputs()
    with torch.no_grad():
        model(**kw)
        t0 = time.monotonic()
        try:
            model(**kw)
        except shardq.distributed.RemoteError as exc:
            return {"error": str(exc), "seconds": time.monotonic() - t0}
    return "no error"


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_rank_failing_mid_forward_reaches_rank_0(tmp_path, how):
    """Rank 1 of 3 raises (or dies) in its stage: rank 0 raises RemoteError naming it, within the group timeout;
    every process ends (run_ranks asserts none is left running)."""
    path = _save("llama", tmp_path / "llama")
    res = run_ranks(_failing_job, 3, str(path), how, timeout_s=10)
    status, out = res[0]
    assert status == "ok" and isinstance(out, dict), res[0]
    assert out["seconds"] < 10 + 5
    if how == "raise":
        assert "rank 1: RuntimeError: injected failure in model.layers" in out["error"]
        assert res[1][0] == "error" and "injected failure" in res[1][1]
        assert res[2][0] == "error" and "injected failure" in res[2][1]  # passed on down the chain
    else:
        assert res[1] == ("missing", None)  # the process died without a word
        assert "rank 2" in out["error"]  # the next rank reports the lost peer
