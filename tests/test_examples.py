"""The examples run as a user runs them (a subprocess, CPU only here) and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_moe_example_quantizes_the_experts():
    out = _run("moe_quantized_experts.py", "--layers", "2", "--experts", "4")
    sizes = {line.split(":")[0].strip(): line for line in out.splitlines() if "of weights" in line}
    assert set(sizes) == {"bf16", "nf4, experts float", "nf4, experts quantized"}
    assert "loaded: 4 expert stacks quantized" in out
    diff = float(out.rsplit("computed in fp32: ", 1)[1].split()[0])
    assert diff < 1e-3


def test_offload_example_runs_with_cpu_and_disk():
    out = _run("offload_oversized.py", "--layers", "6", "--cpu-cap", "220MB")  # 7 blocks on disk, a third of the time
    assert "generated [" in out and "ms per token" in out
    disk = [line for line in out.splitlines() if line.startswith("disk ")]
    assert any(line.split()[1].isdigit() and int(line.split()[1]) > 0 for line in disk)  # memory report: blocks
