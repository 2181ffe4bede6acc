"""`python -m shardq demo` end to end on the CPU (small sizes so it stays quick)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shardq.demo import main  # noqa: E402


def test_demo_int8_offloads_and_matches_in_memory_quantization(tmp_path, capsys):
    assert main(["--quant", "int8", "--layers", "4", "--hidden", "128", "--vocab", "512", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "shardq plan of LlamaForCausalLM" in out and "disk" in out
    assert re.search(r"in memory \(what the loader adds\): max \|logit diff\| 0, greedy generate\(\): 8/8", out)
    rel = float(re.search(r"relative error ([0-9.e-]+)", out).group(1))
    assert 0 < rel < 0.1
    assert any((tmp_path / "offload").glob("*.safetensors"))
    assert (tmp_path / "checkpoint" / "model.safetensors.index.json").exists()


def test_demo_fp32_is_exact(tmp_path, capsys):
    assert main(["--quant", "none", "--layers", "2", "--hidden", "64", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "max |logit diff| 0," in out and "8/8 tokens equal" in out


def test_demo_bad_caps_say_what_to_do(tmp_path, capsys):
    assert main(["--max-memory", "cpu", "--layers", "1", "--hidden", "64", "--out", str(tmp_path)]) == 1
    assert "DEVICE=SIZE" in capsys.readouterr().err


def test_python_m_shardq_demo_help():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "shardq", "demo", "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "--max-memory" in res.stdout
