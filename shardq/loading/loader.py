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

import os
import time
import uuid
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
from shardq.loading.slots import (
    Journal,
    KeyMatch,
    Slot,
    _assign,
    check_meta_buffers,
    fill_meta_buffers,
    match_keys,
    model_slots,
    to_skeleton,
)
from shardq.planning.planner import Placement, Plan, check_offload_mode, plan_model
from shardq.progress import byte_bar
from shardq.quant import sizing
from shardq.quant.experts import QuantizedExperts
from shardq.quant.linear import empty_quantized
from shardq.runtime.dispatch import dispatch_model
from shardq.runtime.offload import host_buffer, pin_buffer, write_disk_offload
from shardq.runtime.offload_folder import OffloadFolder, OffloadFolderError, claim_folder, live_folder

QUANTIZED = ("int8", "nf4", "fp4")


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
    _check_request(model, dtype, offload_mode)
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
        t0 = time.perf_counter()
        _dispatch_planned(model, plan, folder, prefetch)
    except BaseException:
        journal.rollback()
        _abort_offload(claim, folder, load_id)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        raise
    stats.dispatch_seconds = time.perf_counter() - t0
    return _finish(model, plan, stats, claim)


def _check_request(model: nn.Module, dtype: torch.dtype | None, offload_mode: Any) -> None:
    """The arguments' own errors, before anything is read."""
    if hasattr(model, "shardq_runtime"):
        raise LoadError("this model is already loaded and dispatched: build a fresh model (e.g. on meta) to load again")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LoadError(
            f"dtype={dtype!r} is not a floating torch dtype: use torch.float16, torch.bfloat16 or torch.float32"
        )
    check_offload_mode(model, offload_mode)  # names and values now; whether each name is on "cpu": by the planner


def _dispatch_planned(model: nn.Module, plan: Plan, folder: Path | None, prefetch: bool) -> None:
    """Hook the loaded model's blocks as planned (offload modes with their reasons, the working dtype)."""
    offload_modes = {k: m for k, m in plan.offload_modes.items() if plan.device_map[k] == "cpu"}
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


def _finish(model: nn.Module, plan: Plan, stats: LoadStats, claim: OffloadFolder | None) -> nn.Module:
    """Record the plan, the load's statistics (allocator peaks included) and the offload folder's claim."""
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
