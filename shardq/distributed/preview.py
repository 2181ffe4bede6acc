"""The multi-rank plan without any process group: `python -m shardq plan DIR --ranks '2x(1x24GB)'` shows the
stages per rank, each rank's placement and the bytes crossing each link per token."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from shardq.distributed.stages import RankPlan, plan_ranks
from shardq.memory import GPU_MARGIN, DeviceKey, parse_gpus, parse_size


def parse_ranks(spec: str, host: Mapping[Any, Any] | None = None) -> list[dict[DeviceKey, int]]:
    """Budgets per rank from '2x(1x24GB)', '(1x24GB);(2x16GB)' or '2x(cpu=8GB)': each parenthesised part is a rank's
    GPUs as `--gpus` writes them (budget = capacity minus the CUDA margin) or 'cpu=SIZE'; `host` ('cpu'/'disk'
    caps) is added to every rank."""
    extra = {k: parse_size(v) for k, v in (host or {}).items() if k in ("cpu", "disk")}
    out: list[dict[DeviceKey, int]] = []
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        m = re.fullmatch(r"(?:([0-9]+)\s*[xX*]\s*)?\((.+)\)", part)
        if not m:
            raise ValueError(
                f"--ranks part {part!r} is not COUNTx(GPUS) or (GPUS): write e.g. '2x(1x24GB)' or "
                "'(1x24GB);(2x16GB)' or '2x(cpu=8GB)'"
            )
        count, inner = int(m.group(1) or 1), m.group(2).strip()
        if count < 1:
            raise ValueError(f"--ranks part {part!r} asks for {count} ranks: give at least 1")
        if inner.lower().startswith("cpu="):
            budgets: dict[DeviceKey, int] = {"cpu": parse_size(inner[4:])}
        else:
            budgets = {i: max(0, cap - GPU_MARGIN) for i, cap in enumerate(parse_gpus(inner))}
        out += [{**budgets, **{k: v for k, v in extra.items() if k not in budgets}} for _ in range(count)]
    if not out:
        raise ValueError(f"--ranks {spec!r} names no rank: write e.g. '2x(1x24GB)'")
    return out


def preview(
    source: str,
    spec: str,
    quant: Any = None,
    host: Mapping[Any, Any] | None = None,
    dtype: Any = None,
    **plan_kwargs: Any,
) -> RankPlan:
    """The `RankPlan` of the model of `source` (a transformers directory or config.json), built on meta."""
    from shardq import hf

    model = hf.meta_model_from_dir(source, dtype)
    return plan_ranks(model, parse_ranks(spec, host), quant, **plan_kwargs)
