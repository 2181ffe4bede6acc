"""A model's module tree cut into units: the blocks that are placed whole on one device.

A unit is a no-split block (a decoder layer), a leaf module, or the direct tensors of a module that also has
children (named by the module; its children are units of their own, so the longest name prefix owns a tensor).
Units that share a tensor (tied embedding and head) form one group that is placed together.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from shardq.quant.sizing import TensorEntry


@dataclass
class Unit:
    name: str
    entries: list[TensorEntry]
    order: int
    own_only: bool = False  # just the module's direct tensors; its children are units of their own


def decompose(model: nn.Module, split_guard: set[str], prefix: str = "") -> list[str]:
    """Unit names under `prefix`, in model order: a no-split block or a leaf is kept whole; a splittable module
    that also holds tensors directly (a root-level bias or scale) becomes a unit of just those tensors, named
    by the module, followed by its children's units (a nested entry: the longest name prefix owns a tensor)."""
    module = model.get_submodule(prefix) if prefix else model
    children = [name for name, child in module.named_children() if has_tensors(child)]
    if is_whole(module, prefix, split_guard) or not children:
        return [prefix] if has_tensors(module) else []
    out = [prefix] if has_own_tensors(module) else []
    for name in children:
        out += decompose(model, split_guard, f"{prefix}.{name}" if prefix else name)
    return out


def is_whole(module: nn.Module, name: str, split_guard: set[str]) -> bool:
    return type(module).__name__ in split_guard or name in split_guard


def has_own_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in module._parameters.values()) or any(
        t is not None for t in module._buffers.values()
    )


def has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def own_only_unit(model: nn.Module, name: str, split_guard: set[str]) -> bool:
    """True if unit `name` holds only its module's direct tensors (its children are units of their own)."""
    module = model.get_submodule(name) if name else model
    return not is_whole(module, name, split_guard) and any(has_tensors(c) for c in module.children())


def make_units(
    model: nn.Module, names: list[str], entries: dict[str, TensorEntry], split_guard: set[str]
) -> list[Unit]:
    units = []
    for i, n in enumerate(names):
        own = own_only_unit(model, n, split_guard)
        units.append(Unit(n, unit_entries(model, n, entries, own), i, own))
    return units


def unit_entries(
    model: nn.Module, name: str, entries: dict[str, TensorEntry], own_only: bool = False
) -> list[TensorEntry]:
    module = model.get_submodule(name) if name else model
    pre = f"{name}." if name else ""
    names = [n for n, _ in module.named_parameters(remove_duplicate=False, recurse=not own_only)]
    names += [n for n, _ in module.named_buffers(remove_duplicate=False, recurse=not own_only)]
    return [entries[pre + n] for n in names]


def tied_groups(units: list[Unit]) -> list[list[Unit]]:
    """Units merged when they share a tensor (tied weights), in the order of their first member."""
    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, u in enumerate(units):
        for e in u.entries:
            j = owner.setdefault(e.key, i)
            parent[find(i)] = find(j)
    groups: dict[int, list[Unit]] = {}
    for i, u in enumerate(units):
        groups.setdefault(find(i), []).append(u)
    return sorted(groups.values(), key=lambda g: g[0].order)


def entry_units(model: nn.Module, key: str, inner: list[str], split_guard: set[str]) -> list[tuple[str, bool]]:
    """(unit name, own tensors only) for the part of module `key` that no more specific entry in `inner` takes."""
    module = model.get_submodule(key) if key else model
    if not inner:
        names = decompose(model, split_guard, key) if has_tensors(module) else []
        return [(n, own_only_unit(model, n, split_guard)) for n in names]
    out = [(key, True)] if has_own_tensors(module) else []
    for child_name, _ in module.named_children():
        child = f"{key}.{child_name}" if key else child_name
        sub = [k for k in inner if k == child or k.startswith(child + ".")]
        if child not in sub:
            out += entry_units(model, child, sub, split_guard)
    return out
