"""`load_sharded`: plan, validate, quantize on load from safetensors, then dispatch across GPUs, CPU and disk.

The order is what makes the memory promises hold:

1. every check first: the checkpoint's headers (truncation), its names and shapes against the model (one error
   listing every missing, unexpected and mis-shaped tensor), meta buffers nobody can fill, and the plan
   (the planner raises when the model does not fit or the map is bad). Nothing is allocated before this ends.
2. the model becomes a meta skeleton (real weights become the source), quantized layers replace `nn.Linear`
   (and GPT-2's `Conv1D`, whose [in, out] weight is transposed on the host as it is read) on meta where the plan
   stores them quantized.
3. tensors stream one at a time in file order: read → moved to the device of their block → quantized there →
   assigned; the float copy dies at once, so host RAM holds about one tensor beyond what is placed there and a
   GPU never more than its placed bytes plus the planner's load reserve. Blocks planned on "disk" are written to
   the offload folder as soon as their last tensor arrived and dropped from memory.
4. `dispatch_model` hooks the blocks. On any failure every change to the model is undone, so the caller gets
   the model back as it was (still meta, or with its own weights) and no device memory stays allocated.
"""

from __future__ import annotations

import functools
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardq.checkpoint.index import CheckpointError, CheckpointIndex, TensorInfo, index_checkpoint, read_tensor
from shardq.checkpoint.source import LoadError, SourceTensor, checkpoint_source, module_source
from shardq.config import QuantConfig
from shardq.loading.finite import FiniteCheck, check_mode
from shardq.planning.planner import Placement, Plan, check_offload_mode, plan_model
from shardq.progress import byte_bar
from shardq.quant import sizing
from shardq.quant.experts import QuantizedExperts, replace_stack
from shardq.quant.linear import empty_quantized
from shardq.runtime.dispatch import dispatch_model
from shardq.runtime.offload import host_buffer, pin_buffer, write_disk_offload
from shardq.runtime.offload_folder import OffloadFolder, OffloadFolderError, claim_folder, live_folder

QUANTIZED = ("int8", "nf4", "fp4")


# --------------------------------------------------------------------------------------------------------------
# matching checkpoint names to the model


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


# --------------------------------------------------------------------------------------------------------------
# where each tensor goes


@dataclass
class Route:
    """Where one slot is loaded: `device` (torch device it is put on), `dtype`, the disk block it is written into
    (None: stays in memory), and the quantized module it fills (None: assigned as is)."""

    device: torch.device
    dtype: torch.dtype
    disk_block: str | None = None
    qmodule: nn.Module | None = None
    home: torch.device | None = None  # where a quantized module's tensors end up, when not where it is quantized
    transpose: bool = False  # a Conv1D weight: the source's [in, out] becomes [out, in] on the host before quantizing


def owner_unit(name: str, units: Mapping[str, Placement]) -> Placement:
    """The placement whose module holds tensor or module `name` (its longest prefix among the units)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        p = units.get(".".join(parts[:i]))
        if p is not None:
            return p
    raise LoadError(f"tensor {name!r} is in no block of the plan: the device map must cover every module")


def _quant_device(p: Placement, plan: Plan, need: int) -> torch.device:
    """Quantize on the block's GPU; for offloaded blocks on the execution GPU when its reserve has room."""
    if isinstance(p.device, int):
        return torch.device("cuda", p.device)
    ex = plan.execution_device
    if p.run in ("stream", "disk") and ex is not None and torch.cuda.is_available():
        room = plan.reserve_detail.get(ex, {})
        if need <= room.get("load", 0) + room.get("stream", 0):
            return torch.device("cuda", ex)
    return torch.device("cpu")


def swap_quantized(
    model: nn.Module, plan: Plan, cfg: QuantConfig, journal: Journal, exclude: Iterable[str] = ()
) -> dict[str, tuple[nn.Module, bool]]:
    """Replace, on meta, each layer the plan stores quantized (`sizing.quantized_layers`) by an empty
    Linear8bit/Linear4bit (except the `exclude`d modules, which a pre-quantized checkpoint provides whole), and
    each fused expert stack it stores quantized (`sizing.quantized_experts`) by an empty QuantizedExperts.
    Returns weight name -> (new module, whether the source weight is a Conv1D's [in, out] to transpose)."""
    exclude = set(exclude)
    units = {p.name: p for p in plan.placements}
    out = {}
    for name, module in list(sizing.quantized_layers(model, cfg).items()):
        if name in exclude or owner_unit(name, units).quant not in QUANTIZED:
            continue
        dims = sizing.linear_shape(module)
        assert dims is not None  # quantized_layers holds only Linear and Conv1D layers
        out_f, in_f = dims
        new = empty_quantized(in_f, out_f, module.bias is not None, cfg, device="meta", dtype=module.weight.dtype)
        parent, _, attr = name.rpartition(".")
        journal.swap_module(model.get_submodule(parent) if parent else model, attr, new)
        out[f"{name}.weight"] = (new, sizing.is_conv1d(module))
    for name, shape in sizing.quantized_experts(model, cfg).items():
        if owner_unit(name, units).quant not in QUANTIZED:
            continue
        parent, _, attr = name.rpartition(".")
        experts = model.get_submodule(parent)
        new = QuantizedExperts(*shape, cfg, device="meta", dtype=experts._parameters[attr].dtype)
        journal.replace_param(experts, attr, new)
        out[name] = (new, False)
    return out


def plan_routes(
    slots: Mapping[str, Slot], plan: Plan, qweights: Mapping[str, tuple[nn.Module, bool]]
) -> dict[str, Route]:
    """A route for every slot of the (swapped) model; `qweights` as `swap_quantized` returns them."""
    units = {p.name: p for p in plan.placements}
    routes: dict[str, Route] = {}
    stacks = {k: Slot([k], [], (), torch.float32, True) for k in qweights if k not in slots}  # now modules
    for key, slot in {**slots, **stacks}.items():
        places = [owner_unit(n, units) for n in slot.names]
        qmod, transpose = qweights.get(key, (None, False))
        fp32 = cpu_fp32(places[0], plan)
        if qmod is not None:
            p = places[0]
            numel = getattr(qmod, "num_experts", 1) * qmod.out_features * qmod.in_features
            dev = _quant_device(p, plan, numel * (qmod.dtype.itemsize + 4))
            home = torch.device("cuda", p.device) if isinstance(p.device, int) else torch.device("cpu")
            routes[key] = Route(
                dev, torch.float32 if fp32 else qmod.dtype, p.name if p.run == "disk" else None, qmod, home, transpose
            )
            continue
        gpu = next((p for p in places if isinstance(p.device, int)), None)
        want = torch.float32 if fp32 and slot.dtype.is_floating_point else slot.dtype
        if gpu is not None:
            routes[key] = Route(torch.device("cuda", gpu.device), slot.dtype)
        elif len({p.name for p in places}) == 1 and places[0].run == "disk":
            routes[key] = Route(torch.device("cpu"), want, places[0].name)
        else:
            routes[key] = Route(torch.device("cpu"), want)
    return routes


def cpu_fp32(p: Placement, plan: Plan) -> bool:
    """Floating tensors of this block are kept in fp32: the CPU computes them (fp32 offload, or no GPU at all)."""
    return p.quant == "fp32" or p.run == "cpu" or (not isinstance(p.device, int) and plan.execution_device is None)


# --------------------------------------------------------------------------------------------------------------
# streaming


@dataclass
class LoadStats:
    """What the load did: bytes read, seconds, tensors, disk blocks written, peak GPU allocation per device."""

    bytes_read: int = 0
    tensors: int = 0
    seconds: float = 0.0
    disk_blocks: list[str] = field(default_factory=list)
    gpu_peak: dict[int, int] = field(default_factory=dict)
    pinned_bytes: int = 0  # size of the two pinned staging buffers (0: none used)
    dispatch_seconds: float = 0.0


class PinnedReader:
    """Reads GPU-bound tensors from their file straight into one of two pinned host buffers and copies them to
    the GPU asynchronously, so reading tensor i+1 overlaps the copy (and quantization) of tensor i. A buffer is
    reused only after the copy out of it has finished."""

    def __init__(self, nbytes: int) -> None:
        self.buffers = [pin_buffer(*host_buffer(nbytes, pin=True)) for _ in range(2)]  # exact size, not 2^k
        self.done: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def fetch(self, info: TensorInfo, device: torch.device) -> torch.Tensor:
        i, self.turn = self.turn, self.turn ^ 1
        done = self.done[i]
        if done is not None:
            done.synchronize()
        buf = self.buffers[i][: info.nbytes]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != info.nbytes:
            raise CheckpointError(
                f"{info.file} is truncated: tensor {info.name!r} needs {info.nbytes} bytes at "
                f"{info.start}, read {got}; download or save the checkpoint again"
            )
        host = buf.view(info.dtype).view(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)
        out = host.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        self.done[i] = done
        return out


def _pinned_ok(src: SourceTensor, route: Route) -> bool:
    """A straight file → pinned → GPU read: the tensor is in a file, bound for a GPU, and needs no downcast or
    transpose (both happen on the host so that the GPU never holds the wider or the untransposed copy)."""
    return (
        src.info is not None
        and route.device.type == "cuda"
        and not route.transpose
        and not (src.dtype.is_floating_point and route.dtype.itemsize < src.dtype.itemsize)
    )


def make_pinned_reader(
    source: Mapping[str, SourceTensor], keys: Iterable[str], routes_of: Callable[[str], Route]
) -> PinnedReader | None:
    """Two pinned buffers of the largest GPU-bound tensor, or None when no tensor goes to a GPU that way."""
    largest = max((source[k].nbytes for k in keys if _pinned_ok(source[k], routes_of(k))), default=0)
    return PinnedReader(largest) if largest else None


def _fetch(src: SourceTensor, route: Route, pinned: PinnedReader | None = None) -> torch.Tensor:
    """Read one tensor and move it to its device in its target dtype, casting where it moves fewer bytes."""
    if pinned is not None and src.info is not None and _pinned_ok(src, route):
        t = pinned.fetch(src.info, route.device)
        return t.to(route.dtype if t.is_floating_point() else t.dtype).contiguous()
    t = src.read()
    want = route.dtype if t.is_floating_point() else t.dtype
    if want.itemsize < t.dtype.itemsize:
        t = t.to(want)
    if route.transpose:  # on the host, so that a GPU never holds both layouts
        t = t.t().contiguous()
    t = t.to(route.device, non_blocking=False)
    return t.to(want).contiguous()


def _store(journal: Journal, slot: Slot | None, route: Route, value: torch.Tensor) -> None:
    """Quantize into the route's module, or assign the value to every reference of the slot (None: a fused expert
    stack, whose parameter the QuantizedExperts module replaced)."""
    if route.qmodule is None:
        assert slot is not None  # only a fused expert stack has no slot, and its route quantizes
        _assign(journal, slot, value)
        return
    q = route.qmodule
    bias = q.bias.detach() if q.bias is not None else None
    q.load_from_float(value, bias)
    if route.home is None or route.home == route.device:
        return
    for name, buf in list(q._buffers.items()):
        if buf is not None and buf.device.type != "meta":
            q._buffers[name] = buf.to(route.home)
    if q.bias is not None and q.bias.device.type != "meta":
        q.bias = nn.Parameter(q.bias.detach().to(route.home), requires_grad=False)


def stream_tensors(
    model: nn.Module,
    source: Mapping[str, SourceTensor],
    match: KeyMatch,
    routes: Mapping[str, Route],
    journal: Journal,
    offload_dir: Path | None,
    progress: bool | str,
    layers: Mapping[str, QLayer] | None = None,
    plan: Plan | None = None,
    finite: FiniteCheck | None = None,
) -> LoadStats:
    """Load every mapped tensor (and pre-quantized layer) in file order; write each disk block once its last
    tensor arrived."""
    layers = layers or {}
    stats = LoadStats()
    slots = model_slots(model)
    units = {p.name: p for p in plan.placements} if plan is not None else {}
    items: list[tuple[tuple[str, int], str, str | None]] = []  # (order, checkpoint key or layer name, disk block)
    for key, slot_key in match.mapping.items():
        items.append((source[key].order, key, routes[slot_key].disk_block))
    for name, layer in layers.items():
        p = owner_unit(name, units)
        items.append((min(source[k].order for k in layer.keys), name, p.name if p.run == "disk" else None))
    items.sort(key=lambda it: it[0])
    pending: dict[str, int] = {}
    for _, _, block in items:
        if block is not None:
            pending[block] = pending.get(block, 0) + 1
    disk_blocks = {r.disk_block for r in routes.values() if r.disk_block is not None} | set(pending)
    total = sum(source[k].nbytes for k in match.mapping) + sum(
        source[k].nbytes for q in layers.values() for k in q.keys
    )
    pinned = make_pinned_reader(source, match.mapping, lambda k: routes[match.mapping[k]])
    stats.pinned_bytes = 2 * pinned.buffers[0].numel() if pinned is not None else 0
    start = time.perf_counter()
    with byte_bar(total, enabled=progress) as bar:
        for _, key, block in items:
            if key in layers:
                assert plan is not None  # pre-quantized layers are placed by the plan
                nbytes = load_layer(model, layers[key], source, owner_unit(key, units), plan, journal)
            else:
                route = routes[match.mapping[key]]
                value = _fetch(source[key], route, pinned)
                if finite is not None:
                    finite.see(key, value)
                _store(journal, slots.get(match.mapping[key]), route, value)
                nbytes = source[key].nbytes
            stats.bytes_read += nbytes
            stats.tensors += 1
            bar.update(nbytes)
            if block is not None:
                pending[block] -= 1
                if pending[block] == 0:
                    flush_disk_block(model, block, journal, offload_dir)
                    stats.disk_blocks.append(block)
    for block in sorted(disk_blocks - set(stats.disk_blocks)):
        flush_disk_block(model, block, journal, offload_dir)
        stats.disk_blocks.append(block)
    if pinned is not None:
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - start
    return stats


def flush_disk_block(model: nn.Module, block: str, journal: Journal, offload_dir: Path | None) -> None:
    """Write the tensors that live only in `block` to the offload folder, then leave them on meta."""
    assert offload_dir is not None
    module = model.get_submodule(block) if block else model
    pre = f"{block}." if block else ""
    slots_by_id = {id(s.get()): s for s in model_slots(model).values()}
    tensors: dict[str, torch.Tensor] = {}
    owned: list[Slot] = []
    seen: set[int] = set()
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for local, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        slot = slots_by_id[id(t)]
        if not all(n.startswith(pre) for n in slot.names):
            continue
        tensors[local] = t.detach()
        owned.append(slot)
    write_disk_offload(offload_dir, block, tensors)
    for slot in owned:
        t = slot.get()
        _assign(journal, slot, torch.empty(t.shape, dtype=t.dtype, device="meta"))


# --------------------------------------------------------------------------------------------------------------
# pre-quantized (bitsandbytes-layout) checkpoints


@dataclass
class QLayer:
    """A linear stored quantized in the checkpoint: its layout (serialize.LayerSpec), shape and checkpoint keys."""

    name: str
    spec: Any
    in_features: int
    out_features: int
    keys: list[str]


def prequantized_layers(
    model: nn.Module, checkpoint: str | os.PathLike, index: CheckpointIndex
) -> tuple[QuantConfig, dict[str, QLayer]] | None:
    """The quantization and quantized layers of a checkpoint written by transformers + bitsandbytes (or
    shardq.save_quantized), every layer's tensors checked against the headers; None for a float checkpoint."""
    from shardq.quant import serialize

    try:
        cfg = serialize.checkpoint_config(checkpoint, index)
    except CheckpointError:
        return None
    found, _floats = serialize._plan_load(model, index, cfg, lambda k: read_tensor(index.tensors[k]))
    layers = {}
    for name, (spec, in_f, out_f) in found.items():
        rel = serialize._LAYER_KEYS + (serialize.QS_PREFIX + spec.method,)
        layers[name] = QLayer(name, spec, in_f, out_f, [f"{name}.{r}" for r in rel if f"{name}.{r}" in index.tensors])
    return cfg, layers


def _merge_quant(ckpt_cfg: QuantConfig, quant: Any) -> QuantConfig:
    """The checkpoint's own quantization; a user setting may only agree with it (or add fp32 CPU offload)."""
    if quant is None:
        return ckpt_cfg
    user = QuantConfig.from_any(quant)
    if user.method not in ("none", ckpt_cfg.method):
        raise LoadError(
            f"the checkpoint is already quantized with {ckpt_cfg.method!r} but quant={user.method!r} was "
            f"asked: pass quant=None to load it as stored, or load a float checkpoint to re-quantize"
        )
    return ckpt_cfg.replace(fp32_cpu_offload=ckpt_cfg.fp32_cpu_offload or user.fp32_cpu_offload)


def load_layer(
    model: nn.Module, layer: QLayer, source: Mapping[str, SourceTensor], p: Placement, plan: Plan, journal: Journal
) -> int:
    """Read one pre-quantized layer to its block's device and swap it in (dequantized to fp32 where the plan
    keeps the block in fp32 on the CPU). Returns the bytes read."""
    from shardq.quant import serialize

    device = torch.device("cuda", p.device) if isinstance(p.device, int) else torch.device("cpu")
    rel = {
        k[len(layer.name) + 1 :]: source[k].read().to(device)
        for k in layer.keys
        if serialize.QS_PREFIX not in k and not k.endswith("weight_format")
    }
    new = serialize.linear_from_tensors(rel, layer.spec, layer.in_features, layer.out_features, plan.quant, layer.name)
    if p.quant == "fp32":
        new = new.dequantize().float().requires_grad_(False)
    elif cpu_fp32(p, plan):  # packed weights computed on the CPU: fp32 bias and output, as the CPU runs fp32
        new.dtype = torch.float32
        if new.bias is not None:
            new.bias = nn.Parameter(new.bias.detach().float(), requires_grad=False)
    parent, _, attr = layer.name.rpartition(".")
    journal.swap_module(model.get_submodule(parent) if parent else model, attr, new)
    return sum(source[k].nbytes for k in layer.keys)


# --------------------------------------------------------------------------------------------------------------
# entry points


@dataclass
class Source:
    """What a load reads: float tensors by name, pre-quantized layers, and the quantization to use."""

    tensors: dict[str, SourceTensor]
    floats: dict[str, SourceTensor]
    layers: dict[str, QLayer]
    cfg: QuantConfig


def open_source(model: nn.Module, checkpoint: str | os.PathLike | None, quant: Any) -> Source:
    """Index the checkpoint (headers only) or take the model's own weights; detect pre-quantized layers."""
    if checkpoint is None:
        tensors = module_source(model)
        return Source(tensors, tensors, {}, QuantConfig.from_any(quant))
    from shardq.checkpoint.conversions import convert_source, renamed_index

    index = index_checkpoint(checkpoint)
    renamed = renamed_index(model, index)  # a bitsandbytes checkpoint's layer tensors follow their weight's rename
    pre = prequantized_layers(model, checkpoint, renamed)
    if pre is None:
        tensors = convert_source(model, checkpoint_source(index))  # transformers 5 renames and fused experts
        return Source(tensors, tensors, {}, QuantConfig.from_any(quant))
    tensors = checkpoint_source(renamed)
    ckpt_cfg, layers = pre
    taken = {k for layer in layers.values() for k in layer.keys}
    floats = convert_source(model, {k: v for k, v in tensors.items() if k not in taken})
    return Source(floats | {k: tensors[k] for k in taken}, floats, layers, _merge_quant(ckpt_cfg, quant))


def _check_offload_dir(plan: Plan, offload_dir: str | os.PathLike | None) -> Path | None:
    disk = [p.name for p in plan.placements if p.run == "disk"]
    if disk and offload_dir is None:
        raise LoadError(
            f"the plan puts {len(disk)} block(s) on disk (e.g. {disk[:3]}) but no offload_dir was given: "
            "pass offload_dir='some/folder' (it is created), or raise the CPU/GPU caps"
        )
    return Path(offload_dir) if offload_dir is not None else None


def _claim_offload_dir(
    plan: Plan, folder: Path | None, checkpoint: Any, model: nn.Module, load_id: str
) -> OffloadFolder | None:
    """Own the offload folder for this load when the plan writes disk blocks (checked before anything is placed)."""
    disk = [p.name for p in plan.placements if p.run == "disk"]
    if not disk or folder is None:
        return None
    owner = {
        "load": load_id,
        "model": type(model).__name__,
        "checkpoint": os.path.abspath(checkpoint) if checkpoint is not None else None,
    }
    try:
        return claim_folder(folder, plan.totals.get("disk", 0) + plan.reserves.get("disk", 0), disk, owner)
    except OffloadFolderError as e:
        raise LoadError(str(e)) from None


def _abort_offload(claim: OffloadFolder | None, folder: Path | None, load_id: str) -> None:
    """Remove every file this load wrote to its offload folder (also when interrupted inside `claim_folder`)."""
    if claim is None and folder is not None:
        live = live_folder(folder)
        if live is not None and not live.sealed and live.owner.get("load") == load_id:
            claim = live
    if claim is not None:
        claim.abort()


def _reset_peaks() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def load_sharded(
    model: nn.Module,
    checkpoint: str | os.PathLike | None = None,
    *,
    max_memory: Mapping[Any, Any] | None = None,
    quant: Any = None,
    device_map: str | Mapping[str, Any] = "auto",
    offload_dir: str | os.PathLike | None = None,
    offload_mode: str | Mapping[str, str] | None = None,
    workload: tuple[int, int] = (1, 512),
    kv_cache: bool | None = None,
    training: Any = False,
    dtype: torch.dtype | None = None,
    progress: bool | str = True,
    prefetch: bool = True,
    distributed: Any = None,
    nonfinite: str = "warn",
) -> nn.Module:
    """Load `model`'s weights from `checkpoint` (or its own weights) under `max_memory`, quantized by `quant`,
    and dispatch it across GPUs, CPU and disk. Returns the model, with `model.shardq_plan` (the Plan),
    `model.shardq_device_map`, `model.shardq_offload_modes` and `model.shardq_load_stats`.

    `model`: any nn.Module, with real weights or built on the meta device. `checkpoint`: a .safetensors file or a
    directory (single file or shards with model.safetensors.index.json); None loads the model's own weights.
    `quant`: QuantConfig, transformers BitsAndBytesConfig, its dict, or "int8"/"nf4"/"fp4"/"none".
    `device_map`: "auto"/"balanced", "balanced_low_0", "sequential", or an explicit accelerate-format dict.
    `offload_dir`: folder for blocks planned on "disk". `offload_mode`: force "cpu" (fp32 compute on the CPU) or
    "stream" (weights copied to the GPU per forward) for every CPU block, or per block with a dict {block or parent
    module name: mode} (the longest matching name wins; each name must cover a block placed on "cpu"); blocks
    not forced follow the planner's rule (`shardq.planning.runmode`), and
    `model.shardq_offload_modes[block].reason` says why. `workload` = (batch, seq_len) sizes the activation
    reserve, and for generation (`kv_cache`, on by default for causal LMs; False for plain forwards) the KV cache
    of a seq_len-token context (prompt + new tokens). `training` (True or a `shardq.planning.Training`) reserves
    QLoRA training's memory instead (`shardq.planning.reserves`). `dtype`: cast floating weights to it (default:
    the model's own dtypes).
    `progress`: tqdm bar over bytes for loads of 256 MiB or more (False: never, "always": any size).
    Every check (checkpoint, names, shapes, plan) runs before anything is placed; on failure the model is
    left as it was and nothing stays allocated.
    `distributed`: a `shardq.distributed.Pipeline` (stages over torch.distributed, launched by torchrun): each rank
    loads only its stage and rank 0 gets the model; the same arguments otherwise.
    `nonfinite`: what a NaN or Inf in a float weight does, found as each tensor streams in: "warn" (default, names
    the tensors), "error" (the load is rolled back) or "ignore".
    """
    if distributed is not None:  # handed over whole: the pipeline calls back here for this rank's stage
        return distributed.load(
            model,
            checkpoint,
            max_memory=max_memory,
            quant=quant,
            device_map=device_map,
            offload_dir=offload_dir,
            offload_mode=offload_mode,
            workload=workload,
            kv_cache=kv_cache,
            training=training,
            dtype=dtype,
            progress=progress,
            prefetch=prefetch,
        )
    if hasattr(model, "shardq_runtime"):
        raise LoadError("this model is already loaded and dispatched: build a fresh model (e.g. on meta) to load again")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LoadError(
            f"dtype={dtype!r} is not a floating torch dtype: use torch.float16, torch.bfloat16 or torch.float32"
        )
    check_offload_mode(model, offload_mode)  # names and values now; whether each name is on "cpu": by the planner
    finite = FiniteCheck(check_mode(nonfinite))
    src = open_source(model, checkpoint, quant)
    cfg = src.cfg
    slots = model_slots(model)
    provided = {f"{n}.{t}" for n in src.layers for t in ("weight", "bias") if f"{n}.{t}" in slots}
    match = match_keys(src.floats, model, slots, provided)
    backed = set(match.mapping.values()) | provided
    journal = Journal()
    claim, folder, load_id = None, None, uuid.uuid4().hex
    try:
        fill_meta_buffers(model, slots, backed, journal)
        check_meta_buffers(slots, backed)
        to_skeleton(slots, backed, journal, dtype)
        plan = plan_model(
            model,
            quant=cfg,
            max_memory=max_memory,
            device_map=device_map,
            workload=workload,
            offload_mode=offload_mode,
            offload_dir=offload_dir,
            kv_cache=kv_cache,
            training=training,
        )
        folder = _check_offload_dir(plan, offload_dir)
        claim = _claim_offload_dir(plan, folder, checkpoint, model, load_id)
        _reset_peaks()
        qweights = swap_quantized(model, plan, cfg, journal, exclude=src.layers)
        slots_now = {k: v for k, v in model_slots(model).items() if k not in provided}
        routes = plan_routes(slots_now, plan, qweights)
        stats = stream_tensors(model, src.tensors, match, routes, journal, folder, progress, src.layers, plan, finite)
        finite.resolve(quantized=cfg.method in ("nf4", "fp4"))
        offload_modes = {k: m for k, m in plan.offload_modes.items() if plan.device_map[k] == "cpu"}  # with reasons
        t0 = time.perf_counter()
        # with a GPU, "cpu" blocks were loaded in fp32 but the GPU blocks after them work in the planned dtype
        working = getattr(torch, plan.dtype) if plan.execution_device is not None else None
        dispatch_model(
            model,
            plan.device_map,
            offload_modes=offload_modes or None,
            execution_device=plan.execution_device,
            offload_dir=folder,
            prefetch=prefetch,
            dtype=working,
        )
    except BaseException:
        journal.rollback()
        _abort_offload(claim, folder, load_id)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        raise
    stats.dispatch_seconds = time.perf_counter() - t0
    stats.gpu_peak = (
        {i: torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else {}
    )
    if claim is not None:
        claim.seal()
    model.shardq_plan = plan
    model.shardq_load_stats = stats
    model.shardq_offload_folder = claim  # holds the folder's lock for as long as the model lives
    return model


def load_sharded_from_dir(path: str | os.PathLike, *, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """Build the transformers model of the local directory `path` (its config.json, offline) on the meta device
    and `load_sharded` it from the safetensors files there. Keyword arguments go to `load_sharded`."""
    from shardq.hf import meta_model_from_dir

    model = meta_model_from_dir(path, dtype=dtype)
    return load_sharded(model, path, dtype=dtype, **kwargs)
