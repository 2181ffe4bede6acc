"""bench/bench_train.py's own code path on the CPU (--smoke: tiny shape, shardq resident and with layers streamed),
so the GPU run is not where its bugs show up. Checks the JSON the lead renders, not any timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_smoke_writes_its_results(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads((tmp_path / "train.json").read_text())
    assert {"benchmark", "title", "date", "gpu", "command", "columns", "rows", "notes"} <= set(res)
    assert res["benchmark"] == "train"
    rows = {r[1]: dict(zip(res["columns"], r)) for r in res["rows"]}
    assert set(rows) == {"shardq", "shardq_capped"}
    assert all(isinstance(r["step_ms"], float) and r["step_ms"] > 0 for r in rows.values())
    assert rows["shardq_capped"]["resident_layers"] == 1  # two of the three layers streamed
    assert "step_ms" in done.stdout.splitlines()[-3]  # the table is printed last


def test_capped_run_takes_its_layers_from_the_training_plan():
    """The capped contender asks the planner (training reserve: adapters + AdamW, checkpoints, recomputation,
    logits gradient; stream slots) how many layers stay on the GPU, for a hypothetical 80 GB GPU 0."""
    import types

    import pytest

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_train

    from shardq.planning.placement import PlanError

    one = types.SimpleNamespace(batch=1, seq=1024, plan_gpus="1x80GB")
    assert bench_train.planned_resident("13b", 16 * 10**9, one) == 40  # the guide's 13B on a 16 GB GPU: resident
    assert 0 < bench_train.planned_resident("13b", 8 * 10**9, one) < 40  # 8 GB: the rest streamed
    four = types.SimpleNamespace(batch=4, seq=512, plan_gpus="1x80GB")
    with pytest.raises(PlanError, match="does not fit"):  # half the 7B nf4 bytes: the fixed part alone is larger
        bench_train.planned_resident("7b", 1843 * 2**20, four)
