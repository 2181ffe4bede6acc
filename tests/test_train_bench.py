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
