"""Pipeline stages with GPUs: rank 0 on the GPU and rank 1 on the CPU (gloo) against one process holding the same
placement; and, with two GPUs, one rank per GPU over NCCL. Skipped without CUDA (or without a second GPU)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from _f_dist import run_ranks
from _f_models import save_checkpoint

import shardq
from shardq.distributed import Pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GEN = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
# one process holding what the two ranks hold: rank 0's part on GPU 0, rank 1's computed on the CPU
ONE_PROCESS_MAP = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                   "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


def _ids() -> torch.Tensor:
    return torch.randint(1, 500, (4, 7), generator=torch.Generator().manual_seed(1))


def _gpu_cpu_job(rank: int, world: int, path: str, quant: str | None, micro: int):
    caps = [{0: "4GB"}, {"cpu": "2GB"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = shardq.load_sharded(shardq.meta_model_from_dir(path), path, max_memory=caps, quant=quant,
                                    progress=False, workload=(4, 16),
                                    distributed=Pipeline(micro_batches=micro, stages=[2, 2], exit_workers=False))
    if rank > 0:
        model.shardq_pipeline.serve()
        return None
    ids = _ids().cuda()
    with torch.no_grad():
        logits = model(ids).logits.cpu()
        tokens = model.generate(ids, **GEN).cpu()
    model.shardq_pipeline.shutdown()
    return logits, tokens


@pytest.mark.xfail(reason="H100 run of 2026-12-07 (nf4, 2 micro-batches): the ranks finished and generate() ran, "
                   "but logits differed from one process by up to 0.058; this split (fp32/nf4 x 1/2 micro-batches, "
                   "and the gap to a one-row-at-a-time run) has not run on a GPU yet")
@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("micro", [1, 2])
def test_gpu_rank_and_cpu_rank_equal_one_process(tmp_path, quant, micro):
    path = save_checkpoint("llama", tmp_path / "m", dtype=torch.float32, layers=4)
    res = run_ranks(_gpu_cpu_job, 2, str(path), quant, micro, timeout_s=60)
    assert all(s == "ok" for s, _ in res), res
    logits, tokens = res[0][1]
    ref = shardq.load_sharded_from_dir(path, max_memory={0: "4GB", "cpu": "2GB"}, quant=quant, progress=False,
                                       device_map=ONE_PROCESS_MAP, offload_mode="cpu", workload=(4, 16))
    ids = _ids().cuda()
    with torch.no_grad():
        want = ref(ids).logits.cpu()
        want_tokens = ref.generate(ids, **GEN).cpu()
        per_row = torch.cat([ref(ids[i : i + 1]).logits.cpu() for i in range(ids.shape[0])])
    gap, row_gap = (logits - want).abs().max().item(), (logits - per_row).abs().max().item()
    assert torch.allclose(logits, want, rtol=1e-5, atol=1e-5), (
        f"pipeline logits differ from one process by {gap:.3g} (from one process run one row at a time: {row_gap:.3g})"
    )
    assert torch.equal(tokens, want_tokens)


def _nccl_job(rank: int, world: int, path: str):
    model = shardq.load_sharded(shardq.meta_model_from_dir(path), path, max_memory={rank: "4GB"}, quant="nf4",
                                progress=False, workload=(4, 16),
                                distributed=Pipeline(micro_batches=4, exit_workers=False, backend="nccl"))
    if rank > 0:
        model.shardq_pipeline.serve()
        return None
    ids = _ids().cuda(0)
    with torch.no_grad():
        tokens = model.generate(ids, **GEN).cpu()
    model.shardq_pipeline.shutdown()
    return tokens, [s.blocks for s in model.shardq_rank_plan.stages]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_over_nccl_token_equal_one_process(tmp_path):
    path = save_checkpoint("llama", tmp_path / "m", dtype=torch.float16, layers=4)
    res = run_ranks(_nccl_job, 2, str(path), timeout_s=90, backend="nccl")
    assert all(s == "ok" for s, _ in res), res
    tokens, stages = res[0][1]
    split = {b: r for r, blocks in enumerate(stages) for b in blocks}
    ref = shardq.load_sharded_from_dir(Path(path), max_memory={0: "4GB", 1: "4GB"}, quant="nf4", progress=False,
                                       device_map={"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1,
                                                   "lm_head": 1, **split}, workload=(4, 16))
    with torch.no_grad():
        assert torch.equal(tokens, ref.generate(_ids().cuda(0), **GEN).cpu())
