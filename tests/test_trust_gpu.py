"""Trust and integrity on a real GPU: a max_memory cap above the GPU's memory is clipped to it, and a load with
disk blocks streamed to the GPU owns its offload folder and leaves nothing behind when it fails."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _f_models import meta_model, save_checkpoint  # noqa: E402

from shardq.hf import meta_model_from_dir  # noqa: E402
from shardq.loading.loader import LoadError, load_sharded  # noqa: E402
from shardq.planning.planner import plan_model  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cap_above_the_real_gpu_is_clipped():
    from shardq.memory import device_capacities

    total = device_capacities()[0]  # NVML's total (torch's total_memory leaves out what the driver keeps)
    assert total >= torch.cuda.get_device_properties(0).total_memory
    model = meta_model("llama", hidden=128, layers=2)
    with pytest.warns(UserWarning, match="more than the GPU's"):
        p = plan_model(model, "nf4", max_memory={0: 4 * total, "cpu": "1GB"})
    assert p.budgets[0] == total


def test_gpu_load_with_disk_blocks_owns_its_folder(tmp_path):
    ckpt = save_checkpoint("llama", tmp_path / "ck", dtype=torch.float16, layers=4, hidden=128, vocab=256)
    dm = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0,
          **{f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(4)}}
    first = load_sharded(meta_model_from_dir(ckpt), ckpt, quant="nf4", max_memory={0: "2GB", "cpu": "1GB",
                         "disk": "1GB"}, device_map=dm, offload_dir=tmp_path / "off", progress=False)
    ids = torch.arange(3, 11, device="cuda").view(1, 8)
    with torch.no_grad():
        want = first(input_ids=ids).logits
    before = sorted(p.name for p in (tmp_path / "off").iterdir())
    with pytest.raises(LoadError, match="in use by a live model"):
        load_sharded(meta_model_from_dir(ckpt), ckpt, quant="int8", max_memory={0: "2GB", "cpu": "1GB",
                     "disk": "1GB"}, device_map=dm, offload_dir=tmp_path / "off", progress=False)
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == before
    with torch.no_grad():
        torch.testing.assert_close(first(input_ids=ids).logits, want)
