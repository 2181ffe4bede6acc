"""The user's planning arguments checked (workload, device_map spelled as one device, offload modes, dtype), and
what the planner reads off a model before placing it (compute itemsize, quantized shapes, the head's unit)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shardq.config import COMPUTE_DTYPES, QuantConfig
from shardq.memory import DeviceKey, device_label, normalize_device
from shardq.planning.devicemap import unknown_name
from shardq.planning.placement import PlanError
from shardq.planning.runmode import covers, forcing_key
from shardq.planning.units import Unit
from shardq.quant import sizing

STRATEGIES = ("auto", "sequential", "balanced", "balanced_low_0")
OFFLOAD_MODES = ("cpu", "stream")


def whole_model_map(device_map: Any) -> Any:
    """One device for the whole model, as transformers takes it (`device_map=0`, "cuda:1", "cpu",
    torch.device("cuda", 0)), is the map {"": device}; strategies, dicts and anything else pass unchanged."""
    if isinstance(device_map, (Mapping, bool)) or device_map in STRATEGIES:
        return device_map
    if isinstance(device_map, (int, str, torch.device)):
        try:
            normalize_device(device_map, num_gpus=10**6)  # whether it names a device; which ones exist: later
        except ValueError:
            return device_map
        return {"": device_map}
    return device_map


def check_workload(workload: Any) -> tuple[int, int]:
    try:
        batch, seq_len = (int(x) for x in workload)
    except (TypeError, ValueError):
        raise PlanError(f"workload={workload!r} must be (batch, seq_len), e.g. (1, 512)") from None
    if batch < 1 or seq_len < 1:
        raise PlanError(f"workload={workload!r} must have batch >= 1 and seq_len >= 1")
    return batch, seq_len


def check_offload_mode(model: nn.Module, offload_mode: Any) -> str | dict[str, str] | None:
    """The user's forced run modes, checked before anything is planned or loaded: None, "cpu" or "stream" for
    every "cpu" block, or a dict {module name: "cpu" | "stream"}. A name is a block or a parent of blocks
    (accelerate-style module names, "" = the whole model; the longest matching name decides a block). Whether
    each name covers a block placed on "cpu" is checked once the map is known (`check_forced`)."""
    if offload_mode is None or isinstance(offload_mode, str):
        if offload_mode is not None and offload_mode not in OFFLOAD_MODES:
            raise PlanError(
                f"offload_mode={offload_mode!r} is unknown: use 'cpu' (compute on the CPU in fp32) or "
                "'stream' (copy weights to a GPU for each forward)"
            )
        return offload_mode
    if not isinstance(offload_mode, Mapping):
        raise PlanError(
            f"offload_mode must be None, 'cpu', 'stream' or a dict of module name -> 'cpu'|'stream' "
            f"(e.g. {{'model.layers': 'stream', 'model.embed_tokens': 'cpu'}}), not "
            f"{type(offload_mode).__name__}"
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors = dict.fromkeys(
        n for n, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    )
    out: dict[str, str] = {}
    for key, mode in offload_mode.items():
        if not isinstance(key, str):
            raise PlanError(f"offload_mode key {key!r} must be a module name (str), e.g. 'model.layers.3'")
        if key not in modules:
            raise PlanError(unknown_name(key, modules, tensors, "offload_mode key"))
        if not isinstance(mode, str) or mode not in OFFLOAD_MODES:
            raise PlanError(
                f"offload_mode[{key!r}]={mode!r} is unknown: use 'cpu' (compute on the CPU in fp32) or "
                "'stream' (copy weights to a GPU for each forward)"
            )
        out[key] = str(mode)
    return out


def check_forced(units: list[Unit], forced_for: Mapping[str, str], assign: Mapping[str, DeviceKey]) -> None:
    """Each name of a per-block offload_mode covers a block placed on "cpu" (a mode applies only there; a
    parent's blocks elsewhere are left as placed), and no block holding nested entries is forced to stream."""
    for key, mode in forced_for.items():
        mine = [u for u in units if covers(key, u.name)]
        if not mine:
            owner = max((u.name for u in units if covers(u.name, key)), key=len, default=None)
            where = (
                f"is inside block {owner!r}: a mode applies to whole blocks, name {owner!r}"
                if owner is not None
                else "holds no weights of any block: name a block"
            )
            raise PlanError(f"offload_mode names {key!r}, which {where} (or a parent) instead")
        on_cpu = [u for u in mine if assign[u.name] == "cpu"]
        if not on_cpu:
            devs = sorted({device_label(assign[u.name]) for u in mine})
            raise PlanError(
                f"offload_mode names {key!r}, but the plan puts its block(s) on {', '.join(devs)}, not on "
                "'cpu': a forced mode applies only to blocks placed on 'cpu'. Remove the name from "
                "offload_mode, or place the block on 'cpu' (device_map, or a smaller GPU cap in max_memory)"
            )
        nested = [u.name for u in on_cpu if u.own_only and forcing_key(u.name, forced_for) == key]
        if mode == "stream" and nested:
            raise PlanError(
                f"offload_mode[{key!r}]='stream' would stream {nested[0]!r}, which holds tensors of its own "
                "around other device-map entries and cannot stream: force it 'cpu', or name its children"
            )


def quantized_shapes(model: nn.Module, q: QuantConfig) -> list[tuple[int, int]]:
    """(out, in) of every layer the config quantizes (`sizing.quantized_layers`)."""
    out = []
    for m in sizing.quantized_layers(model, q).values():
        dims = sizing.linear_shape(m)
        assert dims is not None  # quantized_layers holds only Linear and Conv1D layers
        out.append(dims)
    return out


def expert_workspace(model: nn.Module, q: QuantConfig, itemsize: int) -> int:
    """The largest expert weight a quantized expert stack dequantizes per call (the eager loop's `stack[e]`)."""
    return max((o * i * itemsize for _, o, i in sizing.quantized_experts(model, q).values()), default=0)


def compute_itemsize(model: nn.Module, q: QuantConfig) -> int:
    if q.compute_dtype is not None:
        return q.compute_dtype.itemsize
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return dtype.itemsize


def head_unit(model: nn.Module, dims: sizing.Dims, units: list[Unit]) -> str | None:
    """The unit holding the output head (the last Linear whose width is the vocabulary)."""
    if not dims.vocab:
        return None
    heads = [n for n, m in model.named_modules() if (s := sizing.linear_shape(m)) is not None and s[0] == dims.vocab]
    if not heads:
        return None
    head = heads[-1]
    for u in units:
        if u.name == "" or head == u.name or head.startswith(u.name + "."):
            return u.name
    return None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating torch dtype from a dtype, its name or a common alias ("fp16", "bf16", "fp32", "half")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    value = COMPUTE_DTYPES.get(name, getattr(torch, name, None))
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise PlanError(f"dtype={dtype!r} is not a floating dtype: use float16, bfloat16 or float32")
    return value


def checkpoint_dtype(index: Any) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's bytes (its working dtype)."""
    floats = {d: n for d, n in index.dtype_counts().items() if d.is_floating_point}
    return max(floats, key=lambda d: floats[d]) if floats else None
