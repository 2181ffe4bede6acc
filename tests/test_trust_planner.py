"""The planner's budgets mean what they say: caps above a device are clipped (with a warning), GPUs left out of
max_memory are reported, the disk cap counts every byte written to the offload folder, and "disk" without "cpu"
counts the host memory disk blocks pass through."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _f_models import meta_model, save_checkpoint  # noqa: E402

from shardq import memory  # noqa: E402
from shardq.hf import meta_model_from_dir  # noqa: E402
from shardq.loading.loader import load_sharded  # noqa: E402
from shardq.memory import parse_size  # noqa: E402
from shardq.planning.planner import PlanError, plan_model  # noqa: E402


def test_cap_above_the_gpu_is_clipped_with_a_warning():
    model = meta_model("llama", hidden=256, layers=4)
    with pytest.warns(UserWarning, match="more than the GPU's"):
        p = plan_model(model, "nf4", max_memory={0: "30GB", "cpu": "1GB"}, gpus="1x8GB")
    assert p.budgets[0] == parse_size("8GB")
    assert any("clipped" in w for w in p.warnings)


def test_clipping_changes_the_plan_when_the_memory_does_not_exist():
    model = meta_model("llama", hidden=512, layers=4, dtype=torch.float32)
    whole = plan_model(model, None, max_memory={0: "1GB"}, gpus="1x1GB", workload=(1, 8))
    assert set(whole.device_map.values()) == {0}
    gpu = int(0.6 * (whole.totals[0] + whole.reserves[0]))
    with pytest.warns(UserWarning, match="clipped"):
        p = plan_model(model, None, max_memory={0: "1GB", "cpu": "1GB"}, gpus=[gpu], workload=(1, 8))
    assert p.budgets[0] == gpu and "cpu" in p.device_map.values()
    assert p.totals[0] + p.reserves[0] <= gpu


def test_gpu_left_out_of_max_memory_is_reported():
    model = meta_model("llama", hidden=128, layers=2)
    with pytest.warns(UserWarning, match=r"GPU\(s\) \[1\] are not in max_memory"):
        p = plan_model(model, None, max_memory={0: "2GB", "cpu": "1GB"}, gpus="2x8GB")
    assert 1 not in p.device_map.values() and any("not used" in w for w in p.warnings)


def test_no_note_when_every_gpu_is_given():
    import warnings

    model = meta_model("llama", hidden=128, layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = plan_model(model, None, max_memory={0: "2GB", 1: "2GB"}, gpus="2x8GB")
    assert p.warnings == [] or not any("max_memory" in w for w in p.warnings)


def test_disk_without_cpu_counts_host_staging(monkeypatch):
    model = meta_model("llama", hidden=256, layers=4, dtype=torch.float32)
    with pytest.warns(UserWarning, match="no 'cpu'"):
        p = plan_model(model, None, max_memory={"disk": "1GB"})
    assert set(p.device_map.values()) == {"disk"}
    assert p.reserve_detail["cpu"].get("disk staging", 0) > 0 and p.totals["cpu"] == 0
    staging = p.reserves["cpu"]
    monkeypatch.setattr(memory, "host_available_memory", lambda: staging // 2)  # the host cannot stage a block
    with pytest.raises(PlanError, match="CPU|cpu"):
        plan_model(model, None, max_memory={"disk": "1GB"})
    with pytest.raises(PlanError, match="no 'cpu' entry"):
        plan_model(model, None, max_memory={"disk": "1GB"}, device_map={"": "cpu"})


def test_disk_cap_counts_headers_and_index(tmp_path):
    ckpt = save_checkpoint("llama", tmp_path / "ck", dtype=torch.float32, layers=4, hidden=64, vocab=128)
    model = meta_model_from_dir(ckpt)
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
          **{f"model.layers.{i}": "disk" for i in range(4)}}
    p = plan_model(model, None, max_memory={"cpu": "1GB", "disk": "1GB"}, device_map=dm)
    assert p.reserve_detail["disk"]["file headers"] > 0
    tight = p.totals["disk"] + p.reserves["disk"]
    with pytest.raises(PlanError, match="Disk|disk"):
        plan_model(model, None, max_memory={"cpu": "1GB", "disk": p.totals["disk"]}, device_map=dm)
    model = load_sharded(model, ckpt, max_memory={"cpu": "1GB", "disk": tight}, device_map=dm,
                         offload_dir=tmp_path / "off", progress=False)
    written = sum(f.stat().st_size for f in (tmp_path / "off").iterdir())
    data = p.totals["disk"]
    assert data < written <= tight, (data, written, tight)  # headers and index counted, within the cap
    assert tight - written < 0.5 * data + 64 * 1024  # the bound is not wildly loose
