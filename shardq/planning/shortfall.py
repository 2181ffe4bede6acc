"""How much memory a refused plan lacks, exactly: for each device, the least extra bytes on that device alone that
make the planner find a plan (a bisection over the planner itself, whose search is complete on small models).

The greedy fill's own figure ("bytes that found no room where the fill stopped") is not that number: a 7B fp16
model under {0: 8GB, cpu: 2GB} lacks GiBs, not the few MiB of the block that stopped the fill. Whether a plan
exists only grows with a budget (more room never removes a placement), so a bisection finds the least extra
that works. A deadline bounds the time on huge models: the figure is then an upper bound, and says so.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from shardq.memory import DeviceKey, device_label, format_size
from shardq.planning.placement import PlanError

DEADLINE_S = 3.0  # time for all devices together; past it a figure is an upper bound


@dataclass(frozen=True)
class Shortfall:
    """The least extra bytes on `device` that make the plan fit (`exact`: to the byte; else an upper bound, and
    `below` extra bytes are known not to be enough)."""

    device: DeviceKey
    extra: int
    exact: bool
    below: int = 0


def least_extra(
    budgets: dict[DeviceKey, int],
    feasible: Callable[[dict[DeviceKey, int]], bool],
    devices: list[DeviceKey],
    ceiling: int,
    deadline_s: float = DEADLINE_S,
) -> list[Shortfall]:
    """For each of `devices`, the least extra bytes (up to `ceiling`) with which `feasible` holds; devices where
    even `ceiling` extra does not help are left out. Sorted by extra bytes."""
    stop = time.perf_counter() + deadline_s
    out = []
    for d in devices:

        def fits(extra: int, d: DeviceKey = d) -> bool:
            return feasible({**budgets, d: budgets[d] + extra})

        if not fits(ceiling):
            continue
        lo, hi = 0, ceiling  # fits(lo) is False (the plan was refused), fits(hi) is True
        while hi - lo > 1 and time.perf_counter() < stop:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        out.append(Shortfall(d, hi, hi - lo <= 1, lo))
    return sorted(out, key=lambda s: s.extra)


def describe(shortfalls: list[Shortfall]) -> str:
    """'at least 1.50 GiB (1610612736 bytes) more on GPU 0 is missing: it fits with 1.50 GiB (...) more on GPU 0,
    or 3.00 GiB (...) more on cpu'."""
    if not shortfalls:
        return "memory is missing, and no single device's cap, raised alone, makes it fit"
    parts = [
        f"{format_size(s.extra)} ({s.extra} bytes) more on {device_label(s.device)}"
        + ("" if s.exact else f" (not with {format_size(s.below)}; the search stopped between the two)")
        for s in shortfalls
    ]
    return "at least " + parts[0] + " is missing: " + "it fits with " + ", or ".join(parts)


def refine_error(error: PlanError, shortfalls: list[Shortfall]) -> PlanError:
    """`error` with its missing-bytes figure replaced by the least extra memory that makes the plan fit."""
    text = describe(shortfalls)
    msg = str(error)
    new, n = re.subn(r"about [^;]*? are missing", text, msg, count=1)
    if not n:
        new = f"the model does not fit in max_memory ({text}): {msg}"
    out = PlanError(new)
    out.missing = shortfalls[0].extra if shortfalls else max(error.missing, 1)
    out.shortfalls = shortfalls
    return out
