"""examples/pipeline_torchrun.py as a user runs it: torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _f_dist import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_example_generates_on_two_processes(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    script = str(ROOT / "examples" / "pipeline_torchrun.py")
    made = subprocess.run([sys.executable, script, "--make", str(tmp_path / "m")], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert made.returncode == 0, made.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), script, "--ckpt", str(tmp_path / "m"), "--micro-batches", "2"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: 4 blocks (model.layers.0 .. model.layers.3) + model.embed_tokens" in done.stdout
    assert "generated 4 x 16 tokens" in done.stdout
    assert done.stdout.count("generated") == 1  # rank 1 served and left; only rank 0 ran the user's code
