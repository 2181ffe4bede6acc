"""Explicit accelerate-format device maps (`{"model.layers": 0, "lm_head": "cpu"}`): names, devices, overlaps
and coverage checked with errors that say the fix, then each entry cut into units on its device."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

from shardq.memory import DeviceKey, device_label, normalize_device, parse_gpus
from shardq.planning.placement import PlanError
from shardq.planning.units import Unit, entry_units, has_own_tensors, unit_entries
from shardq.quant.sizing import TensorEntry


def explicit_units(
    model: nn.Module,
    device_map: Mapping[str, Any],
    entries: dict[str, TensorEntry],
    budgets: Mapping[DeviceKey, int],
    split_guard: set[str],
    gpus: Any,
    stream_all: bool,
) -> tuple[dict[str, DeviceKey], list[Unit]]:
    """Validate an accelerate-format device_map and cut each entry into units on its device. `stream_all`: the
    user forced every "cpu" block to stream (so no "cpu" entry may hold nested entries)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    num_gpus = len(parse_gpus(gpus)) if gpus is not None else None
    resolved: dict[str, DeviceKey] = {}
    for key, value in device_map.items():
        if not isinstance(key, str):
            raise PlanError(f"device_map key {key!r} must be a module name (str)")
        if key not in modules:
            raise PlanError(unknown_name(key, modules, entries))
        try:
            dev = normalize_device(value, num_gpus)
        except ValueError as exc:
            raise PlanError(f"device_map[{key!r}]: {exc}") from None
        if dev not in budgets:
            raise PlanError(
                f"device_map puts {key!r} on {device_label(dev)}, which has no budget in max_memory "
                f"{list(budgets)}: add it to max_memory or map the module elsewhere"
            )
        resolved[key] = dev
    _check_overlaps(resolved, modules, stream_all)
    _check_coverage(resolved, entries)
    units: list[Unit] = []
    assign: dict[str, DeviceKey] = {}
    for key, dev in resolved.items():
        inner = [k for k in resolved if k != key and (key == "" or k.startswith(key + "."))]
        for name, own in entry_units(model, key, inner, split_guard):
            units.append(Unit(name, unit_entries(model, name, entries, own), len(units), own))
            assign[name] = dev
    order = {n: i for i, n in enumerate(modules)}
    units.sort(key=lambda u: order.get(u.name, 0))
    for i, u in enumerate(units):
        u.order = i
    return assign, units


def unknown_name(
    key: str, modules: Mapping[str, nn.Module], entries: Mapping[str, Any], what: str = "device_map key"
) -> str:
    """The error for a name that is not a module: a tensor name gets its module, a typo close matches."""
    if key in entries:
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        return f"{what} {key!r} names a tensor, not a module: name its module {owner!r} (or a parent) instead"
    close = difflib.get_close_matches(key, [m for m in modules if m], n=3, cutoff=0.6)
    hint = f" Did you mean {close}?" if close else ""
    tops = [n for n in modules if n and "." not in n]
    return f"{what} {key!r} is not a module of this model.{hint} Top-level modules: {tops}"


def _check_overlaps(resolved: Mapping[str, DeviceKey], modules: Mapping[str, nn.Module], stream_all: bool) -> None:
    """Entries inside another entry are allowed only under a module that holds tensors itself (its own tensors
    stay with it, the longest name prefix owns each tensor) and that is not offloaded."""
    for a, dev in resolved.items():
        inner = [b for b in resolved if b != a and (a == "" or b.startswith(a + "."))]
        if not inner:
            continue
        if not has_own_tensors(modules[a]):
            raise PlanError(
                f"device_map entries {a!r} and {inner[0]!r} overlap ({inner[0]!r} is inside {a!r}): give "
                "each module once, either the parent or its children"
            )
        if dev == "disk" or (dev == "cpu" and stream_all):
            raise PlanError(
                f"device_map entry {a!r} holds tensors of its own and contains entry {inner[0]!r}, so it "
                f"cannot be offloaded ({dev!r}): put {a!r} on a GPU (or the CPU with offload_mode='cpu')"
            )


def _check_coverage(resolved: Mapping[str, DeviceKey], entries: Mapping[str, TensorEntry]) -> None:
    def covered(name: str) -> bool:
        return any(k == "" or name.startswith(k + ".") for k in resolved)

    left = [n for n in entries if not covered(n)]
    if left:
        owners = list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in left))
        raise PlanError(
            f"device_map leaves {len(left)} tensor(s) unplaced, in module(s) {owners[:6]}"
            f"{' ...' if len(owners) > 6 else ''}: add them (or a parent) to the device_map"
        )
