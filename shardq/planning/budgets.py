"""Budget rules around the placement: the host memory disk blocks pass through when max_memory has "disk" but no
"cpu", and the bytes disk blocks add to the offload folder beyond their data (file headers, index.json)."""

from __future__ import annotations

from collections.abc import Mapping

from shardq import memory
from shardq.config import QuantConfig
from shardq.memory import DeviceKey, format_size
from shardq.planning.placement import PlanError
from shardq.planning.units import Unit


def host_for_disk(budgets: dict[DeviceKey, int]) -> tuple[dict[DeviceKey, int], set[DeviceKey], str]:
    """With "disk" but no "cpu" in max_memory, disk blocks still pass through host memory (reads, two staging
    buffers): that memory is counted against the host's available memory, a budget that holds no block."""
    if "disk" not in budgets or "cpu" in budgets:
        return budgets, set(), ""
    host = int(memory.host_available_memory() * memory.HOST_FRACTION)
    out = {**{k: v for k, v in budgets.items() if k != "disk"}, "cpu": host, "disk": budgets["disk"]}
    note = (
        f"max_memory has 'disk' but no 'cpu': disk blocks are read through host memory, so their staging "
        f"buffers are counted against the host's available memory ({format_size(host)}); no block is placed "
        "on the CPU. Give 'cpu' in max_memory to cap it"
    )
    return out, {"cpu"}, note


def refuse_reserve_only(assign: Mapping[str, DeviceKey], reserve_only: set[DeviceKey]) -> None:
    bad = [k for k, d in assign.items() if d in reserve_only]
    if bad:
        raise PlanError(
            f"device_map puts {bad[:3]} on 'cpu' but max_memory has no 'cpu' entry: only the devices "
            "max_memory names hold blocks; add 'cpu' to max_memory or map those modules elsewhere"
        )


INDEX_RECORD_BYTES = 2048  # the offload index's owner record and fixed keys (shardq.runtime.offload_folder)


def disk_overhead(quant: QuantConfig, units: list[Unit]) -> int:
    """An upper bound on the bytes that disk blocks add to the offload folder beyond their tensors' data: each
    block file's safetensors header (8-byte length, JSON padded to 8, its metadata) and the block's part of
    `index.json` (written with indent=1: every shape dimension on its own line)."""
    total = INDEX_RECORD_BYTES
    parts = 6 if quant.is_4bit else 2  # tensors one quantized weight is stored as (weight, absmax, quant_map, ...)
    for u in units:
        total += 3 * len(u.name) + 400  # header length, metadata, padding; index entry, file name, files list
        for e in u.entries:
            digits = len(str(max(e.numel, 1))) + 1
            per = len(e.name) + 20 + 80 + 8 * digits + 2 * (len(str(e.numel * 8)) + 1)  # header entry
            per += len(e.name) + 20 + 100 + 8 * (digits + 8)  # index entry (indent=1, a line per dimension)
            total += per * (parts if e.quantized else 1)
    return total
