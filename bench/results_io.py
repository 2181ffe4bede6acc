"""One JSON file per benchmark, the source of bench/RESULTS.md's "Latest" tables and README's results table.

Every benchmark script calls `write_result` once at the end: it fills the date and the GPU name, checks the
schema (`check_result`) and writes `bench/results/<benchmark>.json`; `python bench/render_results.py` then
regenerates the generated parts of RESULTS.md and README.md from those files.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KEYS = ("benchmark", "title", "date", "gpu", "command", "columns", "rows", "notes")


def check_result(res: dict[str, Any], where: str = "result") -> None:
    """Raise ValueError naming the file and the field when `res` does not follow the results schema."""
    missing = [k for k in KEYS if k not in res]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}; every result needs {list(KEYS)}")
    for key in ("benchmark", "title", "date", "gpu", "command"):
        if not isinstance(res[key], str) or not res[key]:
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {res[key]!r}")
    try:
        datetime.date.fromisoformat(res["date"][:10])
    except ValueError:
        raise ValueError(f"{where}: 'date' must start with an ISO date (YYYY-MM-DD), got {res['date']!r}") from None
    cols = res["columns"]
    if not isinstance(cols, list) or not cols or not all(isinstance(c, str) for c in cols):
        raise ValueError(f"{where}: 'columns' must be a non-empty list of strings")
    if not isinstance(res["rows"], list):
        raise ValueError(f"{where}: 'rows' must be a list of lists")
    for i, row in enumerate(res["rows"]):
        if not isinstance(row, list) or len(row) != len(cols):
            raise ValueError(
                f"{where}: row {i} has {len(row) if isinstance(row, list) else 'no'} cells for "
                f"{len(cols)} columns; give one cell per column (use null for none)"
            )
    if not isinstance(res["notes"], list) or not all(isinstance(n, str) for n in res["notes"]):
        raise ValueError(f"{where}: 'notes' must be a list of strings (the first one is README's headline)")


def gpu_name() -> str:
    """The name of GPU 0 and how many there are, or "cpu" without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    return torch.cuda.get_device_name(0) + (f" x{n}" if n > 1 else "")


def public_argv(argv: list[str]) -> list[str]:
    """argv without the machine-local --out/--dir paths (a result records how to rerun, not where it ran)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--dir"):
            skip = True
        elif not a.startswith(("--out=", "--dir=")):
            out.append(a)
    return out


def write_result(
    benchmark: str,
    title: str,
    columns: list[str],
    rows: list[list[Any]],
    notes: list[str],
    gpu: str | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Write bench/results/<benchmark>.json (today's date, the command line that ran) and return its path.

    On a lent GPU only $OUT comes back, so with $OUT set a copy goes to $OUT/results/ too: copy it into
    bench/results/ of the checkout and run `python bench/render_results.py`.
    """
    res = {
        "benchmark": benchmark,
        "title": title,
        "date": datetime.date.today().isoformat(),
        "gpu": gpu or gpu_name(),
        "command": "python " + " ".join(sys.argv),
        "columns": columns,
        "rows": rows,
        "notes": notes,
    }
    check_result(res, benchmark)
    path = (out_dir or RESULTS_DIR) / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_result(res))
    if os.environ.get("OUT") and out_dir is None:
        copy = Path(os.environ["OUT"]) / "results" / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(dumps_result(res))
    return path


def dumps_result(res: dict[str, Any]) -> str:
    """The JSON text of a result: one line per key, per row and per note, so that diffs stay readable."""
    lines = []
    for key in KEYS:
        val = res[key]
        if key in ("rows", "notes") and val:
            inner = ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in val)
            lines.append(f' "{key}": [\n{inner}\n ]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(val, ensure_ascii=False)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
