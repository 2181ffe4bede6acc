"""Moving nested activations between devices: `move_to` and the cheap scan `needs_move` that the block wrappers
of `shardq.runtime.dispatch` run on every call.

Both are traceable by torch.compile (dynamo): under tracing, containers are always rebuilt (identity tests on
containers, which dynamo cannot evaluate, only save allocations in eager mode).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

_ATOMS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def move_to(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts, dataclasses/ModelOutput) on `device`.

    Floating tensors are cast to `dtype` when given. Other objects (a transformers KV cache, say) pass through
    untouched: each layer keeps its own cache tensors on its own device. Containers whose contents did not
    change are returned as they are (this runs on every block call, so it is kept cheap).
    """
    if isinstance(obj, _ATOMS):
        return obj
    if isinstance(obj, torch.Tensor):
        cast = dtype is not None and obj.dtype != dtype and obj.is_floating_point()
        if not cast and obj.device == device:
            return obj
        blocking = device.type == "cpu" and obj.device.type != "cpu"  # GPU→host must finish before use
        return obj.to(device=device, dtype=dtype if cast else None, non_blocking=not blocking)
    if isinstance(obj, (list, tuple)):
        items = [move_to(v, device, dtype) for v in obj]
        if _unchanged(items, obj):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, Mapping):
        moved = {k: move_to(v, device, dtype) for k, v in obj.items()}
        if _unchanged([moved[k] for k in obj], list(obj.values())):
            return obj
        cls: Callable[..., Any] = type(obj)  # a concrete mapping class, whose constructor Mapping does not declare
        try:
            return cls(**moved) if dataclasses.is_dataclass(obj) else cls(moved)
        except TypeError:
            return moved
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: move_to(getattr(obj, f.name), device, dtype) for f in dataclasses.fields(obj) if f.init}
        if _unchanged(list(changes.values()), [getattr(obj, k) for k in changes]):
            return obj
        return dataclasses.replace(obj, **changes)
    return obj


def first_float_dtype(obj: Any) -> torch.dtype | None:
    """The dtype of the first floating tensor inside `obj` (tuples, lists, dicts), None if there is none."""
    if isinstance(obj, torch.Tensor):
        return obj.dtype if obj.is_floating_point() else None
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    for v in items:
        found = first_float_dtype(v)
        if found is not None:
            return found
    return None


def _unchanged(new: Any, old: Any) -> bool:
    """Whether every moved item is its original (then the container is returned as it is); never under tracing."""
    return not torch.compiler.is_compiling() and all(a is b for a, b in zip(new, old))


_OPAQUE, _TENSOR, _SEQUENCE, _MAPPING, _DATACLASS = range(5)
_KINDS: dict[type, int] = {}


def _kind(cls: type) -> int:
    """How `needs_move` treats objects of class `cls` (decided once per class)."""
    kind = _KINDS.get(cls)
    if kind is None:
        kind = (
            _TENSOR
            if issubclass(cls, torch.Tensor)
            else _SEQUENCE
            if issubclass(cls, (list, tuple))
            else _MAPPING
            if issubclass(cls, Mapping)
            else _DATACLASS
            if dataclasses.is_dataclass(cls)
            else _OPAQUE
        )
        _KINDS[cls] = kind
    return kind


def needs_move(obj: Any, device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether `move_to(obj, device, dtype)` would change anything (a scan that allocates nothing).

    Written for speed: it runs on every block call, and a forward at batch 1 is bound by host time.
    """
    kind = _kind(type(obj))
    if kind == _TENSOR:
        return obj.device != device or (dtype is not None and obj.dtype != dtype and obj.is_floating_point())
    if kind == _OPAQUE:
        return False
    if kind == _DATACLASS:
        return any(needs_move(getattr(obj, f.name), device, dtype) for f in dataclasses.fields(obj))
    for v in obj.values() if kind == _MAPPING else obj:
        if _kind(type(v)) == _TENSOR:
            if v.device != device or (dtype is not None and v.dtype != dtype and v.is_floating_point()):
                return True
        elif _kind(type(v)) != _OPAQUE and needs_move(v, device, dtype):
            return True
    return False
