"""bench/results/*.json follow the results schema, and RESULTS.md / README.md show exactly what they hold."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
results_io = importlib.import_module("results_io")
render = importlib.import_module("render_results")

GOOD = {
    "benchmark": "x",
    "title": "t",
    "date": "2026-12-07",
    "gpu": "cpu",
    "command": "python bench/x.py",
    "columns": ["a", "b"],
    "rows": [[1, None], ["s", 2.5]],
    "notes": ["headline"],
}


def test_generated_parts_are_in_sync():
    """README's results table and RESULTS.md's Latest tables equal what render_results.py makes of the JSON."""
    for path, text in render.render_files().items():
        assert path.read_text() == text, f"{path.name} is out of date: run `python bench/render_results.py`"


def test_every_result_file_is_valid_and_shown():
    results = render.load_results()
    assert {r["benchmark"] for r in results} >= {"kernels", "offload", "dispatch", "load", "load_large"}
    readme = (ROOT / "README.md").read_text()
    latest = (ROOT / "bench" / "RESULTS.md").read_text()
    for r in results:
        assert f"bench/RESULTS.md#{render.anchor(r)}" in readme and r["date"] in readme
        assert f"### latest: {r['benchmark']}" in latest
        assert r["notes"], f"{r['benchmark']}: the first note is README's headline"


@pytest.mark.parametrize(
    "change,match",
    [
        ({"rows": [[1]]}, "row 0 has 1 cells for 2 columns"),
        ({"date": "Dec 7"}, "ISO date"),
        ({"columns": []}, "non-empty list"),
        ({"notes": "one"}, "list of strings"),
        ({"gpu": ""}, "'gpu'"),
    ],
)
def test_schema_errors_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        results_io.check_result(dict(GOOD, **change), "x.json")
    bad = dict(GOOD)
    del bad["command"]
    with pytest.raises(ValueError, match=r"missing keys \['command'\]"):
        results_io.check_result(bad, "x.json")


def test_write_then_render(tmp_path, monkeypatch):
    """write_result writes a file the renderer reads back unchanged, one line per row; the README row links to it."""
    monkeypatch.delenv("OUT", raising=False)
    path = results_io.write_result(
        "x", "t", ["a", "b"], [[1, None], ["s|t", 2.5]], ["head"], gpu="cpu", out_dir=tmp_path
    )
    data = json.loads(path.read_text())
    assert data["rows"] == [[1, None], ["s|t", 2.5]] and data["command"].startswith("python ")
    assert "  [1, null]," in path.read_text()
    [res] = render.load_results(tmp_path)
    latest = render.render_latest([res])
    assert "| 1 | – |" in latest and "| s\\|t | 2.5 |" in latest and "- head" in latest
    assert "| head | cpu |" in render.render_readme([res])


def test_missing_markers_are_an_error():
    with pytest.raises(ValueError, match="markers"):
        render.replace_between("no markers here", render.README, "body", "README.md")


def test_out_copy_comes_back_from_a_gpu_machine(tmp_path, monkeypatch):
    """On a lent GPU only $OUT returns: write_result puts a copy of the JSON under $OUT/results/."""
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(results_io, "RESULTS_DIR", tmp_path / "results")
    results_io.write_result("y", "t", ["a"], [[1]], ["n"], gpu="cpu")
    assert (tmp_path / "out" / "results" / "y.json").read_text() == (tmp_path / "results" / "y.json").read_text()


def _bench(name: str):
    return importlib.import_module(name)


def test_bench_scripts_write_valid_results(tmp_path, monkeypatch):
    """Each benchmark's JSON writer, fed the raw results its script builds, writes a file the renderer accepts:
    a GPU run is unattended, so a schema slip must show here, not after the device time is spent."""
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(results_io, "RESULTS_DIR", tmp_path)
    kernels_rows = [
        {
            "K": 64,
            "N": 32,
            "M": 1,
            "fp16_us": 9.0,
            "fp16_graph_us": 5.0,
            "sq_nf4_us": 8.0,
            "sq_nf4_graph_us": 4.0,
            "sq_nf4_GBps": 100.0,
            "bnb_int8_t6_us": 300.0,
        },
        {"K": 64, "N": 32, "M": 8, "fp16_us": 9.5, "sq_int8_t6_us": 7.0, "sq_int8_t6_graph_us": 6.0},
    ]
    _bench("bench_kernels").write_json({"hbm_copy_GBps": 1000.0, "torch": "t"}, kernels_rows)
    run = {"token_ms": 10.0, "eff_GBps": 50.0, "relerr": 0.0}
    _bench("bench_offload").write_json(
        {
            "h2d_pinned_GBps": 55.0,
            "param_GB": 3.7,
            "torch": "t",
            "gpu_resident_token_ms": 5,
            "shardq_stream": run,
            "shardq_stream_noprefetch": run,
            "accelerate_cpu_offload": {"token_ms": 80.0, "eff_GBps": 6.0, "relerr": 0.0},
            "shardq_stream_nf4": {"error": "boom"},
        }
    )
    metric = {"plain_ms": 1.0, "shardq_ms": 1.1, "overhead": 0.1}
    _bench("bench_dispatch").write_json(
        {
            "what": "1 GPU",
            "entries": 12,
            "generate_equal": True,
            "relerr": 0.0,
            "torch": "t",
            "generate_ms_per_token": metric,
        },
        ["generate_ms_per_token"],
    )
    load_rows = [
        {
            "case": "shardq_nf4",
            "load_s": 1.0,
            "host_peak_over_base_MB": 5.0,
            "gpu_load_peak_MB": 400.0,
            "gpu_prefill512_peak_MB": 500.0,
            "token_ms": 3.0,
        },
        {"case": "hf_nf4", "error": "Traceback ... boom"},
    ]
    import argparse

    _bench("bench_load").write_json(load_rows, argparse.Namespace(size="anchor", cap="600MB"), 1.9, 600.0)
    _bench("bench_pieces").write_json(
        [
            {"K": 64, "N": 32, "M": 512, "what": "nf4", "fp16": 1.0, "dequantize": 2.0},
            {"K": 64, "M": 512, "what": "int8 prepare t6", "prep": 3.0},
        ],
        1000.0,
    )
    names = {r["benchmark"] for r in render.load_results(tmp_path)}
    assert names == {"kernels", "offload", "dispatch", "load", "pieces"}
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["columns"][2:5] == ["fp16 graph µs", "sq_nf4 graph µs", "bnb_int8_t6 call µs"]
    assert kernels["rows"][0][-3:] == [10.0, 1.25, None]  # % of HBM, fp16/nf4, no int8 at M=1
