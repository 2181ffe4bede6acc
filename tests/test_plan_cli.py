"""`python -m shardq plan` / tools/plan.py: table, JSON, options, and errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _f_models import save_checkpoint

from shardq.cli import main, parse_caps

ROOT = Path(__file__).resolve().parents[1]
SEED = {"transformer.word_embeddings": 0, "transformer.word_embeddings_layernorm": 0, "lm_head": "cpu",
        "transformer.h": 0, "transformer.ln_f": 0}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"llama": save_checkpoint("llama", root / "llama", shards=3, hidden=64, layers=6, vocab=300),
            "bloom": save_checkpoint("bloom", root / "bloom", hidden=64, layers=2, vocab=300)}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_table_folds_layers_and_shows_totals(ckpt, capsys):
    rc, out, _ = _run(capsys, ckpt["llama"], "--gpus", "2x1GB", "--quant", "nf4", "--max-memory",
                      "0=150KB,1=1GB,cpu=1GB", "--seq-len", "8")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"shardq plan of {ckpt['llama']}: float16, quantization nf4")
    assert any(line.startswith("module") and "% of budget" in line for line in lines)
    assert any("model.layers.{" in line and "blocks)" in line for line in lines)
    for dev in ("GPU 0", "GPU 1", "cpu"):
        assert any(line.startswith(dev) for line in lines)
    assert lines[-1].startswith("total ") and "nothing offloaded" in lines[-1]
    rc, full, _ = _run(capsys, ckpt["llama"], "--gpus", "2x1GB", "--quant", "nf4", "--full", "--seq-len", "8")
    assert all(f"model.layers.{i} " in full for i in range(6))


def test_json_output(ckpt, capsys):
    rc, out, _ = _run(capsys, ckpt["llama"], "--gpus", "1x1GB", "--quant", "fp4", "--double-quant", "--json",
                      "--max-memory", '{"0": "300KB", "cpu": "200KB", "disk": "1GB"}', "--batch", "2", "--seq-len", "4")
    assert rc == 0
    d = json.loads(out)
    assert d["quant"]["method"] == "fp4" and d["quant"]["double_quant"] is True
    assert d["workload"] == [2, 4] and d["budgets"] == {"0": 300000, "cpu": 200000, "disk": 10**9}
    assert set(d["offload_modes"].values()) <= {"stream", "disk"} and d["offload_modes"]
    for dev, budget in d["budgets"].items():
        assert d["totals"][dev] + d["reserves"][dev] <= budget


def test_offloaded_summary_line(ckpt, capsys):
    rc, out, _ = _run(capsys, ckpt["llama"], "--gpus", "1x1GB", "--quant", "int8", "--max-memory",
                      "0=300KB,cpu=300KB,disk=1GB", "--seq-len", "8")
    assert rc == 0
    summary, cost = out.splitlines()[-2:]
    assert "offloaded" in summary and "to cpu" in summary and "to disk" in summary and "run on GPU 0" in summary
    assert cost.startswith("per forward: ") and "copied to GPU 0" in cost and "read from disk" in cost
    assert "(PCIe 25 GB/s and disk 2 GB/s assumed;" in cost
    rc, out, _ = _run(capsys, ckpt["llama"], "--gpus", "1x1GB", "--quant", "int8", "--max-memory",
                      "0=300KB,cpu=300KB,disk=1GB", "--seq-len", "8", "--pcie-gbps", "50", "--disk-gbps", "0.5")
    assert "(PCIe 50 GB/s and disk 0.5 GB/s assumed;" in out.splitlines()[-1]


def test_per_forward_cost_in_json_and_its_estimate(ckpt, capsys):
    """The JSON's per_forward bytes are the streamed and disk blocks' bytes as stored; the estimate is the slower
    of the two transfers."""
    rc, out, _ = _run(capsys, ckpt["llama"], "--gpus", "1x1GB", "--quant", "int8", "--max-memory",
                      "0=300KB,cpu=300KB,disk=1GB", "--seq-len", "8", "--json")
    d = json.loads(out)
    placed = d["placements"]
    stream = sum(p["nbytes"] for p in placed if p["run"] == "stream")
    disk = sum(p["nbytes"] for p in placed if p["run"] == "disk")
    assert disk > 0 and d["per_forward"] == {"pcie_bytes": stream + disk, "disk_bytes": disk,
                                             "cpu_bytes": sum(p["nbytes"] for p in placed if p["run"] == "cpu")}
    from shardq.planning.placement import ForwardCost

    cost = ForwardCost(**d["per_forward"])
    assert cost.seconds(10, 1) == max((stream + disk) / 10e9, disk / 1e9)


def test_seed_device_map_from_file(ckpt, capsys, tmp_path):
    f = tmp_path / "map.json"
    f.write_text(json.dumps(SEED))
    rc, out, _ = _run(capsys, ckpt["bloom"], "--gpus", "1x24GB", "--quant", "int8", "--fp32-cpu-offload",
                      "--device-map", f, "--json", "--seq-len", "8")
    assert rc == 0
    d = json.loads(out)
    assert d["strategy"] == "explicit" and d["offload_modes"] == {"lm_head": "cpu"}
    assert next(p for p in d["placements"] if p["name"] == "lm_head")["quant"] == "fp32"
    rc, out, _ = _run(capsys, ckpt["bloom"], "--gpus", "1x24GB", "--device-map", json.dumps(SEED), "--seq-len", "8")
    assert rc == 0 and "warning: tied tensor" in out


def test_config_only_source(ckpt, capsys):
    other = ckpt["llama"].parent / "llama-70b-like.json"  # any file name, not just config.json
    other.write_text((ckpt["llama"] / "config.json").read_text())
    rc, out, _ = _run(capsys, other, "--gpus", "2x24GB", "--strategy", "balanced",
                      "--quant", "int8", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["strategy"] == "balanced" and any("config.json alone" in w for w in d["warnings"])


@pytest.mark.parametrize("argv,match", [
    (["--max-memory", "0=lots"], "lots"), (["--max-memory", "0:1GB"], "DEVICE=SIZE"),
    (["--max-memory", "{bad"], "not valid JSON"), (["--quant", "int3"], "int3"),
    (["--max-memory", "5=1GB"], "GPU '5' does not exist"), (["--device-map", "{\"nope\": 0}"], "not a module"),
    (["--device-map", "nofile"], "neither a JSON object nor a JSON file"), (["--batch", "0"], "batch >= 1"),
    (["--dtype", "int8"], "not a floating dtype"), (["--blocksize", "3", "--quant", "nf4"], "blocksize"),
    (["--max-memory", "0=1KB,cpu=1KB"], "does not fit in max_memory"),
])
def test_errors_exit_2_with_message(ckpt, capsys, argv, match):
    rc, out, err = _run(capsys, ckpt["llama"], "--gpus", "2x1GB", *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and match in err


def test_missing_checkpoint(capsys, tmp_path):
    rc, _, err = _run(capsys, tmp_path / "nowhere")
    assert rc == 2 and "nowhere does not exist: give a checkpoint directory" in err


def test_no_gpu_here_without_hypothetical_gpus(ckpt, capsys, monkeypatch):
    from shardq import memory

    monkeypatch.setattr(memory, "gpu_count", lambda: 0)
    rc, _, err = _run(capsys, ckpt["llama"], "--max-memory", "0=1GB")
    assert rc == 2 and "GPUs here are [none]" in err and "hypothetical" in err
    rc, out, _ = _run(capsys, ckpt["llama"], "--max-memory", "cpu=1GB", "--json")
    assert rc == 0 and json.loads(out)["cpu_mode"] == "cpu"


def test_parse_caps():
    assert parse_caps("0=600MB, 1=1GB,cpu=8GB") == {"0": "600MB", "1": "1GB", "cpu": "8GB"}
    assert parse_caps('{"cuda:0": 5}') == {"cuda:0": 5}
    assert parse_caps(None) is None


@pytest.mark.parametrize("entry", [["-m", "shardq", "plan"], [str(ROOT / "tools" / "plan.py")]])
def test_entry_points(ckpt, entry):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *entry, str(ckpt["llama"]), "--gpus", "2x24GB", "--quant", "nf4",
                          "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["quant"]["method"] == "nf4"
    if entry[0] != "-m":  # both entry points run the same main(); each subprocess costs seconds of imports
        return
    bad = subprocess.run([sys.executable, *entry, str(ckpt["llama"]), "--max-memory", "0=1GB"], capture_output=True,
                         text=True, env={**env, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_split_skip_and_offload_options(ckpt, capsys):
    base = [ckpt["llama"], "--gpus", "1x1GB", "--json", "--seq-len", "8"]
    rc, out, _ = _run(capsys, *base, "--no-split", "LlamaForCausalLM")
    assert rc == 0 and list(json.loads(out)["device_map"]) == [""]
    rc, out, _ = _run(capsys, *base, "--quant", "int8", "--skip-modules", "mlp,lm_head")
    d = json.loads(out)
    assert d["quant"]["skip_modules"] == ["mlp", "lm_head"] and rc == 0
    rc, out, _ = _run(capsys, *base, "--quant", "int8", "--max-memory", "0=200KB,cpu=10MB", "--offload-mode", "cpu")
    d = json.loads(out)
    assert rc == 0 and d["cpu_mode"] == "cpu" and set(d["offload_modes"].values()) == {"cpu"}
    assert all(p["quant"] == "fp32" for p in d["placements"] if p["device"] == "cpu")


@pytest.mark.parametrize("value", ["0", "-3", "fast"])
def test_bad_transfer_rate_is_refused(ckpt, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main([str(ckpt["llama"]), "--gpus", "1x1GB", "--pcie-gbps", value])
    assert exc.value.code == 2
    assert "is not a positive rate in GB/s" in capsys.readouterr().err


def test_help_is_fast_and_needs_no_torch():
    """`python -m shardq --help`, `plan --help` and `demo --help` answer without importing torch (it takes seconds)."""
    code = ("import sys, contextlib, io; from shardq.__main__ import main\n"
            "for argv in (['--help'], ['plan', '--help'], ['demo', '--help']):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try: rc = main(argv)\n"
            "        except SystemExit as e: rc = e.code\n"
            "    assert rc == 0 and (argv[0] in out.getvalue() or 'plan' in out.getvalue()), (argv, rc, out.getvalue())\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


def test_top_level_usage(capsys):
    from shardq.__main__ import main as top

    assert top(["--help"]) == 0
    out = capsys.readouterr().out
    assert "plan" in out and "demo" in out and "python -m shardq.kernels --check" in out
    assert top([]) == 2 and "no command given" in capsys.readouterr().err
    assert top(["plna"]) == 2 and "unknown command 'plna'" in capsys.readouterr().err


def test_cli_mirrors_the_planner_constants():
    """The parser keeps copies of the planner's defaults so that --help needs no torch: they must agree."""
    from shardq import cli
    from shardq.planning import placement, planner

    assert cli.STRATEGIES == planner.STRATEGIES
    assert (cli.PCIE_GBPS, cli.DISK_GBPS) == (placement.PCIE_GBPS, placement.DISK_GBPS)


@pytest.mark.parametrize("alias,name", [("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"),
                                        ("torch.float32", "float32"), ("FP32", "float32")])
def test_dtype_aliases(ckpt, capsys, alias, name):
    rc, out, err = _run(capsys, ckpt["llama"], "--gpus", "1x1GB", "--dtype", alias, "--json")
    assert rc == 0, err
    import torch

    from shardq.planning.planner import plan as plan_fn

    expected = plan_fn(os.fspath(ckpt["llama"]), gpus="1x1GB", dtype=getattr(torch, name))
    assert json.loads(out)["totals"] == json.loads(expected.to_json())["totals"]


def test_wrong_kind_of_source_says_which_usage(ckpt, capsys, tmp_path):
    """A .safetensors file, a folder with only config.json, a folder without config.json: exit 2, the fix named."""
    shard = next(Path(ckpt["llama"]).glob("*.safetensors"))
    rc, _, err = _run(capsys, shard)
    assert rc == 2 and "is one safetensors file: give the directory holding it" in err
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text((Path(ckpt["llama"]) / "config.json").read_text())
    rc, _, err = _run(capsys, only_config)
    assert rc == 2 and "no *.safetensors weights" in err and "config.json" in err
    rc, out, err = _run(capsys, only_config / "config.json", "--gpus", "1x1GB", "--json")  # the usage it suggests
    assert rc == 0 and json.loads(out)["placements"], err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(capsys, empty)
    assert rc == 2 and "has no config.json" in err


def test_python_api_names_the_usage_for_a_safetensors_file(ckpt):
    """shardq.plan / load_sharded_from_dir given one .safetensors file: the error says to pass its directory."""
    import shardq
    from shardq.hf import ModelConfigError

    shard = next(Path(ckpt["llama"]).glob("*.safetensors"))
    with pytest.raises(ModelConfigError, match="is a safetensors file: give the directory holding it"):
        shardq.plan(os.fspath(shard), gpus="1x1GB")
    with pytest.raises(ModelConfigError, match="is a safetensors file"):
        shardq.load_sharded_from_dir(shard, max_memory={"cpu": "1GB"})
