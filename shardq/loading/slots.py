"""The model's tensor slots, checkpoint names matched to them, and the journal that undoes a failed load.

`model_slots` lists every parameter and buffer a load may fill; `match_keys` maps checkpoint names onto them
(prefix changes, transformers' renames, ignore lists) and reports every missing, unexpected and mis-shaped tensor
in one error; `Journal` records each assignment and module swap so `rollback` restores the model as it was.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardq.checkpoint.source import LoadError, SourceTensor
from shardq.quant.experts import replace_stack


@dataclass
class Slot:
    """One distinct tensor of the model: every (module, attribute) that refers to it and its names."""

    names: list[str]
    refs: list[tuple[nn.Module, str, bool]]  # (holder, attribute, is_parameter)
    shape: tuple[int, ...]
    dtype: torch.dtype
    persistent: bool

    def get(self) -> torch.Tensor:
        holder, attr, is_param = self.refs[0]
        return (holder._parameters if is_param else holder._buffers)[attr]


def model_slots(model: nn.Module) -> dict[str, Slot]:
    """Distinct tensors by their first name, with every reference (tied parameters share one slot)."""
    persistent = set(model.state_dict(keep_vars=True))
    by_id: dict[int, Slot] = {}
    for is_param in (True, False):
        for mod_name, module in model.named_modules(remove_duplicate=False):
            store = module._parameters if is_param else module._buffers
            for attr, t in store.items():
                if t is None:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                slot = by_id.get(id(t))
                if slot is None:
                    slot = by_id[id(t)] = Slot([], [], tuple(t.shape), t.dtype, False)
                if full not in slot.names:
                    slot.names.append(full)
                if (module, attr, is_param) not in slot.refs:
                    slot.refs.append((module, attr, is_param))
                slot.persistent = slot.persistent or full in persistent
    return {s.names[0]: s for s in by_id.values()}


@dataclass
class KeyMatch:
    """Checkpoint name → slot name, plus what was deliberately left out (extra copies of tied tensors)."""

    mapping: dict[str, str]
    ignored: list[str] = field(default_factory=list)
    transform: str = "identity"


def _ignore_patterns(model: nn.Module, attr: str) -> list[re.Pattern]:
    pats = getattr(model, attr, None) or []
    return [re.compile(p) for p in pats]


def _candidate_transforms(ckpt: Iterable[str], model_names: set[str]) -> list[tuple[str, Callable[[str], str | None]]]:
    """Name rewrites for the usual prefix differences (a base model's checkpoint in a head model, and back)."""
    out: list[tuple[str, Callable[[str], str | None]]] = [("identity", lambda k: k)]
    heads = {k.split(".", 1)[0] for k in ckpt if "." in k}
    for p in sorted(heads):
        out.append((f"strip {p}.", functools.partial(_strip_prefix, p)))
    for p in sorted({n.split(".", 1)[0] for n in model_names if "." in n}):
        out.append((f"add {p}.", functools.partial(_add_prefix, p)))
    return out


def _strip_prefix(prefix: str, key: str) -> str | None:
    return key[len(prefix) + 1 :] if key.startswith(prefix + ".") else None


def _add_prefix(prefix: str, key: str) -> str:
    return f"{prefix}.{key}"


def match_keys(
    source: Mapping[str, SourceTensor], model: nn.Module, slots: Mapping[str, Slot], provided: Iterable[str] = ()
) -> KeyMatch:
    """Map the source's names onto the model's slots; raise one LoadError listing every problem. `provided`:
    slots filled another way (the layers of a pre-quantized checkpoint), never missing."""
    name_to_slot = {n: key for key, s in slots.items() if s.persistent for n in s.names}
    best: tuple[int, str, Callable[[str], str | None]] | None = None
    for label, fn in _candidate_transforms(source, set(name_to_slot)):
        hits = sum(1 for k in source if fn(k) in name_to_slot)
        if best is None or hits > best[0]:
            best = (hits, label, fn)
    assert best is not None
    _, label, fn = best
    skip_unexpected = _ignore_patterns(model, "_keys_to_ignore_on_load_unexpected")
    skip_missing = _ignore_patterns(model, "_keys_to_ignore_on_load_missing")
    mapping: dict[str, str] = {}
    taken: set[str] = set()
    ignored, outside, unexpected, wrong = [], [], [], []
    for key, src in source.items():
        target = fn(key)
        slot_key = name_to_slot.get(target) if target is not None else None
        if slot_key is None:
            if target is None:
                outside.append(key)  # outside the stripped prefix: a head the model lacks
            elif any(p.search(key) for p in skip_unexpected):
                ignored.append(key)  # the model declares it ignorable
            else:
                unexpected.append(key)
            continue
        if slot_key in taken:
            ignored.append(key)  # a second copy of a tied tensor
            continue
        slot = slots[slot_key]
        shown = key if src.name == key else f"{key} (checkpoint {src.name})"  # renamed or fused by transformers
        if tuple(src.shape) != slot.shape:
            wrong.append(f"{shown}: checkpoint {list(src.shape)}, model {list(slot.shape)}")
            continue
        if src.dtype.is_floating_point != slot.dtype.is_floating_point:  # e.g. int8 codes without their config
            wrong.append(
                f"{shown}: checkpoint {str(src.dtype).removeprefix('torch.')}, model "
                f"{str(slot.dtype).removeprefix('torch.')}"
            )
            continue
        mapping[key] = slot_key
        taken.add(slot_key)
    loaded = taken | set(provided)
    missing = [
        k
        for k, s in slots.items()
        if s.persistent and k not in loaded and not any(p.search(n) for n in s.names for p in skip_missing)
    ]
    if unexpected or missing or wrong:
        raise LoadError(_mismatch_message(missing, unexpected, wrong, label))
    if outside:
        warnings.warn(
            f"{len(outside)} checkpoint tensor(s) outside the model's part of the checkpoint were not used "
            f"(name rewrite '{label}'), e.g. {outside[:3]}",
            stacklevel=3,
        )
    return KeyMatch(mapping, ignored + outside, label)


def _mismatch_message(missing: list[str], unexpected: list[str], wrong: list[str], label: str) -> str:
    def part(title: str, items: list[str]) -> str:
        if not items:
            return ""
        more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more

    how = "" if label == "identity" else f" (after the name rewrite '{label}')"
    return (
        "the checkpoint does not match the model"
        + how
        + ":"
        + part("missing from the checkpoint", missing)
        + part("unexpected in the checkpoint (no such tensor in the model)", unexpected)
        + part("wrong shape or dtype", wrong)
        + "\nNothing was loaded. Build the model from the checkpoint's own config.json "
        "(shardq.meta_model_from_dir / load_sharded_from_dir), or give the checkpoint saved from this model."
    )


def fill_meta_buffers(model: nn.Module, slots: Mapping[str, Slot], backed: set[str], journal: Journal) -> None:
    """Recompute non-persistent buffers built on meta (rotary `inv_freq`, Gemma's `embed_scale`) with transformers'
    own `_init_weights`.

    Only modules whose own tensors are all still on meta are touched: the buffers the checkpoint lacks become real
    and are initialised; what `_init_weights` writes into their other tensors lands on meta and is discarded (the
    checkpoint fills those later), so no loaded weight is ever re-initialised.
    """
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    meta_ids = {id(s.get()) for k, s in slots.items() if k not in backed and s.get().device.type == "meta"}
    for module in model.modules():
        own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
        todo = [n for n, b in module._buffers.items() if b is not None and id(b) in meta_ids]
        if not todo or not all(t.device.type == "meta" for t in own):
            continue
        for name in todo:
            journal.set_tensor(module, name, False, torch.empty_like(module._buffers[name], device="cpu"))
        init(module)


def check_meta_buffers(slots: Mapping[str, Slot], source_backed: set[str]) -> None:
    """Tensors that are neither in the checkpoint nor real (a non-persistent buffer built on meta) cannot be filled."""
    bad = [k for k, s in slots.items() if k not in source_backed and s.get().device.type == "meta"]
    if bad:
        raise LoadError(
            f"{len(bad)} tensors are on the meta device and not in the checkpoint, e.g. {bad[:4]} "
            "(non-persistent buffers such as rotary inv_freq): build the model with "
            "shardq.meta_model_from_dir or accelerate.init_empty_weights() (include_buffers=False), "
            "which keep buffers real"
        )


# --------------------------------------------------------------------------------------------------------------
# undoing a failed load


class Journal:
    """Remembers the first value of every tensor slot and module it changes, to put them all back on failure."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[int, str, bool], tuple[nn.Module, str, bool, Any]] = {}
        self._modules: list[tuple[nn.Module, str, nn.Module]] = []
        self._stacks: list[tuple[nn.Module, str, Any]] = []  # (experts module, attribute, its config before)

    def set_tensor(self, holder: nn.Module, attr: str, is_param: bool, value: torch.Tensor | None) -> None:
        store = holder._parameters if is_param else holder._buffers
        key = (id(holder), attr, is_param)
        if key not in self._tensors:
            self._tensors[key] = (holder, attr, is_param, store.get(attr))
        store[attr] = value

    def swap_module(self, parent: nn.Module, attr: str, new: nn.Module) -> None:
        self._modules.append((parent, attr, parent._modules[attr]))
        parent._modules[attr] = new

    def replace_param(self, parent: nn.Module, attr: str, new: nn.Module) -> None:
        """Put module `new` where `parent` held parameter `attr` (a fused expert stack); undone by rollback."""
        self._stacks.append((parent, attr, parent.__dict__.get("config")))
        self._tensors.setdefault((id(parent), attr, True), (parent, attr, True, parent._parameters[attr]))
        replace_stack(parent, attr, new)

    def rollback(self) -> None:
        for parent, attr, config in reversed(self._stacks):
            parent._modules.pop(attr, None)
            if config is not None:
                parent.config = config
        for parent, attr, old in reversed(self._modules):
            parent._modules[attr] = old
        for holder, attr, is_param, old in self._tensors.values():
            (holder._parameters if is_param else holder._buffers)[attr] = old
        self._modules.clear()
        self._tensors.clear()
        self._stacks.clear()


def _assign(journal: Journal, slot: Slot, value: torch.Tensor) -> None:
    """Point every reference of `slot` at `value` (a Parameter where the model had one)."""
    was_param = slot.refs[0][2]
    new = nn.Parameter(value, requires_grad=False) if was_param else value
    for holder, attr, is_param in slot.refs:
        journal.set_tensor(holder, attr, is_param, new)


def to_skeleton(slots: Mapping[str, Slot], backed: set[str], journal: Journal, dtype: torch.dtype | None) -> None:
    """Replace every source-backed tensor by a meta tensor (in `dtype` if floating and given), ties kept."""
    for key in backed:
        slot = slots[key]
        want = dtype if dtype is not None and slot.dtype.is_floating_point else slot.dtype
        _assign(journal, slot, torch.empty(slot.shape, dtype=want, device="meta"))
        slot.dtype = want
