"""Run a model across GPUs, the CPU and disk following an accelerate-format device map.

`dispatch_model(model, device_map)` places every block (device-map entry) and wraps its forward:

- a GPU block is moved to its GPU; its wrapper moves incoming activations there (GPU→GPU copies are
  non-blocking, peer-to-peer where the driver allows);
- a "cpu" block runs in one of two modes: "cpu" computes on the CPU in fp32 (the bitsandbytes fp32-offload
  behaviour: floating weights are cast to fp32, floating inputs too, and outputs go back to the input's dtype
  on the main device), or "stream": its weights stay in pinned host memory and are copied to the execution GPU
  for each forward, the next block's copy overlapping the current compute (`shardq.runtime.offload.Streamer`). The
  user forces modes with `offload_modes`; otherwise each block gets the rule of `shardq.planning.runmode` (with a GPU:
  lookup blocks such as embeddings "cpu", computing blocks "stream");
- a "disk" block's weights live in `offload_dir` as safetensors and are read ahead by a thread, then streamed.

The model's outputs come back on the main device (`execution_device`, else the first GPU of the map, else the
CPU). Without a GPU everything runs on the CPU, through the same streaming code. Readable state:
`model.shardq_device_map` (normalised map), `model.shardq_offload_modes` (how each block runs, as `RunMode`
strings whose `.reason` says why), `memory_report(model)` / `format_memory_report(...)` (bytes per device,
allocator counters on GPUs). A dispatched transformers model reports the main device as `model.device` and its
dtype before dispatch as `model.dtype` (see `shardq.runtime.model_class`).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardq.memory import DeviceKey, format_size, gpu_count, normalize_device
from shardq.planning.runmode import (
    DEFAULT_WORKLOAD,
    BlockKind,
    RunMode,
    choose_cpu_run,
    forced,
    forcing_key,
    lookup_width,
)
from shardq.runtime.decode import reset_graphs
from shardq.runtime.model_class import expose_main_device
from shardq.runtime.moving import first_float_dtype, move_to, needs_move
from shardq.runtime.offload import (
    DiskBlock,
    Streamer,
    open_disk_block,
    pack_host_block,
    read_disk_index,
    views,
    write_disk_offload,
)

MODES = ("gpu", "cpu", "stream", "disk")


class DispatchError(ValueError):
    """A device map or offload setting that cannot be run; raised before anything is moved."""


@dataclass
class _Ref:
    """One place a tensor is reachable from: `holder._parameters[attr]` or `holder._buffers[attr]`."""

    holder: nn.Module
    attr: str
    is_param: bool

    def get(self) -> torch.Tensor:
        return (self.holder._parameters if self.is_param else self.holder._buffers)[self.attr]

    def set(self, value: torch.Tensor | None) -> None:
        (self.holder._parameters if self.is_param else self.holder._buffers)[self.attr] = value


@dataclass
class _Tensor:
    """A distinct tensor of the model (tied tensors appear once) and every block that reaches it."""

    tensor: torch.Tensor
    names: list[str]
    dtype: torch.dtype  # dtype before dispatch
    refs: dict[str, list[_Ref]] = field(default_factory=dict)  # block name -> refs inside that block
    home: str | None = None  # block that holds it; None = held only by offloaded blocks (packed in each)
    packed: bool = False  # a home-less tied tensor already re-pointed at a packed copy


@dataclass
class Block:
    """Runtime state of one device-map entry.

    `mode` is one of MODES; `exec_device` is where its forward computes; `out_device`, when set, is where its
    outputs are sent (nested entries return to their parent's device, "cpu" blocks to the main device).
    `owned` tensors live with this block; `borrowed` ones are tied tensors that live elsewhere and are copied
    in for each forward (only for resident blocks: streamed blocks pack their own copy).
    """

    name: str
    device: DeviceKey
    mode: str
    exec_device: torch.device
    out_device: torch.device | None = None
    owned: list[_Tensor] = field(default_factory=list)
    borrowed: list[_Tensor] = field(default_factory=list)
    streamed: bool = False
    targets: Sequence[_Tensor | None] = field(default_factory=list)  # per streamed tensor (block layout order)
    in_dtype: torch.dtype | None = None
    orig_dtype: torch.dtype | None = None  # floating dtype of its weights before dispatch (see `_wrap_block`)
    saved: list[tuple[_Ref, torch.Tensor]] = field(default_factory=list)


@dataclass
class Runtime:
    """Everything `dispatch_model` set up; kept on the model as `model.shardq_runtime`."""

    device_map: dict[str, DeviceKey]
    modes: dict[str, RunMode]
    main_device: torch.device
    blocks: dict[str, Block]
    streamer: Streamer | None
    offload_dir: Path | None
    wrapped: list = field(default_factory=list)  # (module, instance forward it had before, or None)
    model_class: type | None = None  # the model's class before `model_class.expose_main_device` swapped it
    model_dtype: torch.dtype | None = None  # the model's floating dtype before dispatch
    graph_decode: bool = True  # static-cache generate() replays decode steps from graphs (shardq.runtime.decode)
    graph_fuse: bool = False  # the fast loop's step compiled by torch.compile before capture (fewer kernels)
    decoder: Any = None  # its GraphDecoder, made on first use
    fast: Any = None  # its fast_decode.FastState (static graph loops of generate()), made on first use


# --------------------------------------------------------------------------------------------------------------
# validating the map


def _device_of(key: DeviceKey) -> torch.device:
    return torch.device("cuda", key) if isinstance(key, int) else torch.device("cpu")


def normalize_map(model: nn.Module, device_map: Mapping[str, Any]) -> dict[str, DeviceKey]:
    """The device map with checked keys (module names, in model order) and normalised device keys."""
    if not isinstance(device_map, Mapping) or not device_map:
        raise DispatchError(
            f"device_map must be a non-empty dict of module name -> device, got {device_map!r}; "
            "use {'': 0} to put the whole model on GPU 0"
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = [k for k in device_map if k not in modules]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(modules), n=1) for k in unknown}
        detail = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise DispatchError(
            f"device_map names modules the model does not have: {detail}; keys must be module names "
            "from model.named_modules() ('' is the whole model)"
        )
    count = gpu_count()
    out = {}
    for name in (n for n in modules if n in device_map):
        try:
            key = normalize_device(device_map[name], count)
        except ValueError as e:
            raise DispatchError(f"device_map[{name!r}]: {e}") from None
        if key not in ("cpu", "disk") and not isinstance(key, int):
            raise DispatchError(f"device_map[{name!r}] = {device_map[name]!r}: use a GPU index, 'cpu' or 'disk'")
        out[name] = key
    seen: dict[int, str] = {}
    for name in out:
        other = seen.setdefault(id(modules[name]), name)
        if other != name:
            raise DispatchError(
                f"device_map entries {other!r} and {name!r} are the same module object (an alias); "
                "keep only one of them"
            )
    return out


def _resolve_modes(
    model: nn.Module, entries: dict[str, DeviceKey], tensors: list[_Tensor], offload_modes: Any, has_gpu: bool
) -> dict[str, RunMode]:
    """Every block's mode: the user's `offload_modes` for "cpu" blocks (a string for all, or a dict per block or
    parent name, the longest covering name winning as in the planner), else the rule of `shardq.planning.runmode`; a
    `RunMode` given with a reason (the loader's plan) keeps it."""
    cpu = [k for k, v in entries.items() if v == "cpu"]
    keys: dict[str, str] = {}
    if offload_modes is None or isinstance(offload_modes, str):
        given = {k: offload_modes for k in cpu} if offload_modes else {}
    elif isinstance(offload_modes, Mapping):
        found = {k: forcing_key(k, offload_modes) for k in cpu}
        keys = {k: key for k, key in found.items() if key is not None}
        stray = [k for k in offload_modes if k not in keys.values()]
        if stray:
            raise DispatchError(
                f"offload_modes names {stray}, which are not 'cpu' entries of the device map (nor "
                "parents of one); a mode applies only to blocks mapped to 'cpu'"
            )
        given = {k: offload_modes[key] for k, key in keys.items()}
    else:
        raise DispatchError(
            f"offload_modes must be None, 'cpu', 'stream' or a dict of block -> mode, got {offload_modes!r}"
        )
    bad = {k: m for k, m in given.items() if m not in ("cpu", "stream")}
    if bad:
        raise DispatchError(
            f"offload_modes {bad}: a 'cpu' block runs as 'cpu' (compute on the CPU in fp32) "
            "or 'stream' (weights copied to the GPU for each forward)"
        )
    how = (
        (lambda k: f"offload_modes={offload_modes!r}")
        if isinstance(offload_modes, str)
        else (lambda k: f"offload_modes[{keys[k]!r}]")
    )
    chosen = {k: m if isinstance(m, RunMode) and m.reason else forced(m, how(k)) for k, m in given.items()}
    rest = [k for k in cpu if k not in chosen]
    if rest:
        chosen.update(_rule_modes(model, entries, tensors, rest, has_gpu))
    return {
        name: RunMode("gpu")
        if isinstance(key, int)
        else RunMode("disk", "disk: read back per forward")
        if key == "disk"
        else chosen[name]
        for name, key in entries.items()
    }


def _rule_modes(
    model: nn.Module, entries: dict[str, DeviceKey], tensors: list[_Tensor], names: list[str], has_gpu: bool
) -> dict[str, RunMode]:
    """The `shardq.planning.runmode` rule for the "cpu" blocks `names` (workload: `DEFAULT_WORKLOAD`)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    nested = {n for n in entries if any(e != n and (n == "" or e.startswith(n + ".")) for e in entries)}
    widths = {n: lookup_width(modules[n], own_only=n in nested) for n in entries}
    out = {}
    for name in names:
        mine = [r for r in tensors if name in r.refs]
        partners = {b for r in mine for b in r.refs if b != name and not widths[b]}
        dtype = next((r.dtype for r in mine if r.dtype.is_floating_point), torch.float32)
        kind = BlockKind(
            widths[name],
            sum(r.tensor.numel() * r.dtype.itemsize for r in mine),
            min(partners) if partners else None,
            name in nested,
        )
        out[name] = choose_cpu_run(kind, has_gpu=has_gpu, workload=DEFAULT_WORKLOAD, itemsize=dtype.itemsize)
    return out


def _owner(name: str, entries: Mapping[str, Any]) -> str | None:
    """The entry that holds tensor or module `name`: its longest prefix among the entries."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in entries:
            return prefix
    return None


def _check_nesting(entries: dict[str, DeviceKey], modes: Mapping[str, str]) -> None:
    for name, mode in modes.items():
        if mode in ("stream", "disk"):
            inner = [e for e in entries if e != name and (name == "" or e.startswith(name + "."))]
            if inner:
                raise DispatchError(
                    f"block {name!r} is offloaded ({mode}) but contains other device-map entries "
                    f"{inner[:5]}; map its children instead, or put {name!r} on a GPU or the CPU"
                )


def _collect_tensors(model: nn.Module, entries: dict[str, DeviceKey]) -> list[_Tensor]:
    """Every distinct parameter and buffer, with the blocks reaching it; uncovered tensors are an error."""
    found: dict[int, _Tensor] = {}
    uncovered = []
    for is_param, named in (
        (True, model.named_parameters(remove_duplicate=False)),
        (False, model.named_buffers(remove_duplicate=False)),
    ):
        for qname, t in named:
            if t is None:
                continue
            block = _owner(qname, entries)
            if block is None:
                uncovered.append(qname)
                continue
            holder_name, _, attr = qname.rpartition(".")
            rec = found.setdefault(id(t), _Tensor(t, [], dtype=t.dtype))
            rec.names.append(qname)
            rec.refs.setdefault(block, []).append(_Ref(model.get_submodule(holder_name), attr, is_param))
    if uncovered:
        raise DispatchError(
            f"{len(uncovered)} tensors are not covered by the device map, e.g. {uncovered[:5]}; "
            "add entries for their modules (or '' for everything not listed)"
        )
    return list(found.values())


def _choose_homes(tensors: list[_Tensor], modes: Mapping[str, str]) -> None:
    """A tied tensor lives once: on its first GPU block, else its first CPU block, else in host memory."""
    for rec in tensors:
        blocks = list(rec.refs)
        if len(blocks) == 1:
            rec.home = blocks[0]
            continue
        for wanted in ("gpu", "cpu"):
            rec.home = next((b for b in blocks if modes[b] == wanted), None)
            if rec.home is not None:
                break


def _check_loaded(tensors: list[_Tensor], modes: Mapping[str, str], disk: dict[str, DiskBlock]) -> None:
    meta = [
        r.names[0]
        for r in tensors
        if r.tensor.device.type == "meta" and not (r.home is not None and modes[r.home] == "disk" and r.home in disk)
    ]
    if meta:
        raise DispatchError(
            f"{len(meta)} tensors are still on the meta device (never loaded), e.g. {meta[:5]}; "
            "load the weights first (shardq.load_sharded) or map those blocks to 'disk' with their "
            "weights written to offload_dir"
        )


def _check_disk(blocks: dict[str, Block], offload_dir: Path | None) -> dict[str, DiskBlock]:
    """Open existing disk blocks and check them against the module's tensors."""
    disk_blocks = [b for b in blocks.values() if b.mode == "disk"]
    if not disk_blocks:
        return {}
    if offload_dir is None:
        raise DispatchError(
            f"blocks {[b.name for b in disk_blocks][:5]} are mapped to 'disk' but no offload_dir was "
            "given; pass offload_dir='some/folder'"
        )
    have = read_disk_index(offload_dir)["blocks"] if (offload_dir / "index.json").exists() else {}
    out = {}
    for b in disk_blocks:
        if b.name not in have:
            continue
        stored = open_disk_block(offload_dir, b.name)
        want = {_local(b.name, r): (r.tensor.dtype, tuple(r.tensor.shape)) for r in b.owned}
        got = {s.name: (s.dtype, s.shape) for s in stored.specs}
        wrong = [
            f"{k}: module {v[0]} {list(v[1])}, file " + (f"{got[k][0]} {list(got[k][1])}" if k in got else "missing")
            for k, v in want.items()
            if got.get(k) != v
        ]
        if wrong:
            raise DispatchError(
                f"offload file for block {b.name!r} does not match the module: {wrong[:5]}; "
                "delete the offload folder and load again"
            )
        out[b.name] = stored
    return out


def _local(block: str, rec: _Tensor) -> str:
    """The tensor's name relative to `block` (first of its names inside the block)."""
    for n in rec.names:
        if block == "":
            return n
        if n.startswith(block + "."):
            return n[len(block) + 1 :]
    raise KeyError(block)


# --------------------------------------------------------------------------------------------------------------
# placing


def _set_all(rec: _Tensor, value: torch.Tensor, replace: bool = False) -> None:
    """Point every reference of `rec` at `value` (in place through `.data` unless `replace`)."""
    if not replace and value.device.type != "meta":
        rec.tensor.data = value
        return
    new = nn.Parameter(value, requires_grad=False) if isinstance(rec.tensor, nn.Parameter) else value
    for refs in rec.refs.values():
        for ref in refs:
            ref.set(new)
    rec.tensor = new


def _place(rt: Runtime, disk: dict[str, DiskBlock], pin: bool) -> None:
    for b in rt.blocks.values():
        if b.mode == "gpu":
            for rec in b.owned:
                _set_all(rec, rec.tensor.data.to(b.exec_device))
        elif b.mode == "cpu":
            for rec in b.owned:
                t = rec.tensor.data
                _set_all(rec, t.to("cpu", torch.float32 if t.is_floating_point() else None))
        elif b.mode == "stream":
            _place_stream(rt, b, pin)
        elif b.mode == "disk":
            _place_disk(rt, b, disk)


def _place_stream(rt: Runtime, b: Block, pin: bool) -> None:
    """Pack the block into one pinned buffer. Tied tensors it shares with other blocks are packed too (in their
    original dtype), so a forward copies one buffer and allocates nothing; a tied tensor with no resident home
    is re-pointed at its first packed copy."""
    packed = b.owned + b.borrowed
    block = pack_host_block(b.name, {_local(b.name, r): r.tensor.data.to(r.dtype) for r in packed}, pin)
    for rec, view in zip(packed, views(block.buffer, block.specs)):
        if any(rec is o for o in b.owned) or (rec.home is None and not rec.packed):
            _set_all(rec, view)
            rec.packed = True
    b.targets, b.borrowed = packed, []
    assert rt.streamer is not None  # made by dispatch_model when any block streams
    rt.streamer.add(block)


def _place_disk(rt: Runtime, b: Block, disk: dict[str, DiskBlock]) -> None:
    """Write the block to the offload folder unless the loader already did; its own tensors go to meta."""
    assert rt.streamer is not None and rt.offload_dir is not None  # _check_disk raised without offload_dir
    if b.name not in disk:
        real = [r for r in b.owned + b.borrowed if r.tensor.device.type != "meta"]
        write_disk_offload(rt.offload_dir, b.name, {_local(b.name, r): r.tensor.data.to(r.dtype) for r in real})
        disk[b.name] = open_disk_block(rt.offload_dir, b.name)
    by_name = {_local(b.name, r): r for r in b.owned + b.borrowed}
    b.targets = [by_name.get(s.name) for s in disk[b.name].specs]
    in_file = {id(r) for r in b.targets if r is not None}
    b.borrowed = [r for r in b.borrowed if id(r) not in in_file]
    for rec in b.owned:
        _set_all(rec, torch.empty(rec.tensor.shape, dtype=rec.tensor.dtype, device="meta"), replace=True)
    rt.streamer.add(disk[b.name])


# --------------------------------------------------------------------------------------------------------------
# forward wrappers (cheaper than torch hooks: this runs for every block on every token)


def _swap_in(b: Block, rec: _Tensor, value: torch.Tensor) -> None:
    for ref in rec.refs[b.name]:
        b.saved.append((ref, ref.get()))
        ref.set(value)


def _enter(rt: Runtime, b: Block, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Before a block's forward: inputs to its device (fp32 for "cpu" blocks), streamed and borrowed weights in."""
    cast = torch.float32 if b.mode == "cpu" else None
    if cast is not None:
        b.in_dtype = first_float_dtype((args, kwargs))
    if needs_move(args, b.exec_device, cast) or needs_move(kwargs, b.exec_device, cast):
        args, kwargs = move_to((args, kwargs), b.exec_device, cast)
    if b.streamed or b.borrowed:
        _swap_weights(rt, b, cast)
    return args, kwargs


@torch.compiler.disable
def _swap_weights(rt: Runtime, b: Block, cast: torch.dtype | None) -> None:
    """Streamed and borrowed weights into the block. Eager under torch.compile (one graph break): slots, events
    and the read-ahead thread are host state that no graph can hold."""
    if b.streamed:
        assert rt.streamer is not None
        for rec, view in zip(b.targets, rt.streamer.acquire(b.name)):
            if rec is not None:
                _swap_in(b, rec, view)
    for rec in b.borrowed:
        want = cast if (cast is not None and rec.dtype.is_floating_point) else rec.dtype
        _swap_in(b, rec, rec.tensor.data.to(b.exec_device, want, non_blocking=True))


@torch.compiler.disable
def _exit(rt: Runtime, b: Block) -> None:
    """After a block's forward (also on error): original tensors back, streaming slot released (eager, as
    `_swap_weights`)."""
    while b.saved:
        ref, original = b.saved.pop()
        ref.set(original)
    if b.streamed:
        assert rt.streamer is not None
        rt.streamer.release(b.name)


def _wrap_block(module: nn.Module, rt: Runtime, b: Block) -> None:
    inner = module.forward
    # "cpu" blocks compute in fp32; their floating outputs return to the dtype of their first floating input
    # (rotary cos/sin follow the hidden states, not their fp32 buffer), else to the block's weight dtype
    # (an embedding fed integer ids)
    back = torch.float32 if b.mode == "cpu" else None
    swaps = b.streamed or bool(b.borrowed)  # weights swapped in and out: a graph break each under torch.compile

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _enter(rt, b, args, kwargs)
        try:
            out = inner(*args, **kwargs)
        finally:
            if swaps:
                _exit(rt, b)
        if b.out_device is not None:
            dtype = (b.in_dtype or b.orig_dtype) if back is not None else None
            if needs_move(out, b.out_device, dtype):
                out = move_to(out, b.out_device, dtype)
        return out

    _install(module, forward, rt)


def _wrap_root(model: nn.Module, rt: Runtime) -> None:
    """Model inputs to the main device (unless '' is itself a block), outputs back on it."""
    inner = model.forward
    move_in = "" not in rt.blocks
    main = rt.main_device

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if move_in and (needs_move(args, main, None) or needs_move(kwargs, main, None)):
            args, kwargs = move_to((args, kwargs), main)
        out = inner(*args, **kwargs)
        return move_to(out, main) if needs_move(out, main, None) else out

    _install(model, forward, rt)


def _install(module: nn.Module, forward: Any, rt: Runtime) -> None:
    previous = module.__dict__.get("forward")  # an instance-level forward someone else installed, if any
    module.forward = forward
    rt.wrapped.append((module, previous))


# --------------------------------------------------------------------------------------------------------------
# entry point


def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, Any],
    *,
    offload_modes: Any = None,
    execution_device: Any = None,
    offload_dir: str | Path | None = None,
    prefetch: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Place `model`'s blocks by `device_map` and wrap their forwards so a plain `model(...)` runs across devices.

    `device_map`: module name → GPU index, "cpu" or "disk" ('' = whole model). `offload_modes`: for "cpu"
    blocks, "cpu" (compute on the CPU, fp32) or "stream" (copy weights to the GPU per forward); one string for
    all or a dict per block or parent name (the longest covering name wins); blocks it does not cover follow
    `shardq.planning.runmode` (without a GPU "cpu"; with one, lookup blocks such as embeddings "cpu", computing blocks
    "stream"). `execution_device`: the GPU that
    streamed blocks run on and outputs return to (default: the map's first GPU). `offload_dir`: folder of
    disk blocks (written here from the module's weights unless `write_disk_offload` already wrote them).
    `prefetch`: copy the next offloaded block while the current one computes. `dtype`: the model's working
    dtype when the weights of its "cpu" blocks were already upcast to fp32 (the loader passes the planned dtype
    when a GPU runs the rest): `model.dtype` reports it and "cpu" blocks fed no floating input (an embedding)
    return their outputs in it; default: the first floating parameter's dtype, and each block's own weight
    dtype. Everything is checked before
    anything moves. Returns the model.
    """
    if hasattr(model, "shardq_runtime"):
        raise DispatchError("this model is already dispatched; build or load a fresh model to dispatch it again")
    entries = normalize_map(model, device_map)
    has_gpu = gpu_count() > 0
    tensors = _collect_tensors(model, entries)
    modes = _resolve_modes(model, entries, tensors, offload_modes, has_gpu)
    _check_nesting(entries, modes)
    main = _main_device(entries, modes, execution_device, has_gpu)
    stream_dev = main if main.type == "cuda" else torch.device("cpu")
    _choose_homes(tensors, modes)
    blocks = _make_blocks(entries, modes, tensors, main, stream_dev)
    offload_dir = Path(offload_dir) if offload_dir is not None else None
    disk = _check_disk(blocks, offload_dir)
    _check_loaded(tensors, modes, disk)

    streamer = Streamer(stream_dev, prefetch) if any(m in ("stream", "disk") for m in modes.values()) else None
    working = _working_dtype(blocks, tensors, dtype)
    rt = Runtime(entries, modes, main, blocks, streamer, offload_dir, model_dtype=working)
    _place(rt, disk, pin=stream_dev.type == "cuda")
    if streamer is not None:
        streamer.allocate()
    modules = dict(model.named_modules(remove_duplicate=False))
    fp32_cpu = main.type == "cpu" and working in (None, torch.float32) and _all_fp32(tensors)
    for b in blocks.values():
        if needs_wrapper(b, blocks, main, fp32_cpu):
            _wrap_block(modules[b.name], rt, b)
    _wrap_root(model, rt)
    model.shardq_runtime = rt
    model.shardq_device_map = dict(entries)
    model.shardq_offload_modes = dict(modes)
    expose_main_device(model, rt)
    return model


def needs_wrapper(b: Block, blocks: dict[str, Block], main: torch.device, fp32_cpu: bool = False) -> bool:
    """Whether a block's forward must be wrapped. Not for a block resident on the main device with nothing
    borrowed, when every block hands its outputs to that device too (so its inputs are always there already):
    "no cost when nothing moves" (the model's own forward, not a wrapper, then calls it). `fp32_cpu`: the model
    runs on the CPU with every floating weight in fp32, so a "cpu" block's fp32 cast is a no-op and it counts as
    resident too."""
    resident = b.mode == "gpu" or (fp32_cpu and b.mode == "cpu")
    if not resident or b.borrowed or b.exec_device != main or b.out_device not in (None, main):
        return True
    return any((o.out_device or o.exec_device) != main for o in blocks.values())


def _all_fp32(tensors: list[_Tensor]) -> bool:
    return all(t.dtype == torch.float32 for t in tensors if t.dtype.is_floating_point)


def _working_dtype(blocks: dict[str, Block], tensors: list[_Tensor], dtype: torch.dtype | None) -> torch.dtype | None:
    """The model's working dtype: `dtype` when given (then also what "cpu" blocks fed no floating input return),
    else its first floating parameter's dtype before dispatch."""
    if dtype is None:
        return next(
            (r.dtype for r in tensors if r.dtype.is_floating_point and isinstance(r.tensor, nn.Parameter)), None
        )
    for b in blocks.values():
        if b.mode == "cpu":
            b.orig_dtype = dtype
    return dtype


def _main_device(
    entries: dict[str, DeviceKey], modes: Mapping[str, str], execution_device: Any, has_gpu: bool
) -> torch.device:
    if execution_device is not None:
        try:
            key = normalize_device(execution_device, gpu_count())
        except ValueError as e:
            raise DispatchError(f"execution_device: {e}") from None
        if key == "disk":
            raise DispatchError("execution_device cannot be 'disk': give a GPU index or 'cpu'")
        return _device_of(key)
    first_gpu = next((k for k in entries.values() if isinstance(k, int)), None)
    if first_gpu is not None:
        return _device_of(first_gpu)
    if has_gpu and any(m in ("stream", "disk") for m in modes.values()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _make_blocks(
    entries: dict[str, DeviceKey],
    modes: Mapping[str, str],
    tensors: list[_Tensor],
    main: torch.device,
    stream_dev: torch.device,
) -> dict[str, Block]:
    blocks = {}
    for name, key in entries.items():
        mode = modes[name]
        exec_dev = _device_of(key) if mode == "gpu" else torch.device("cpu") if mode == "cpu" else stream_dev
        parent = _owner(name.rpartition(".")[0], {k: v for k, v in entries.items() if k != name}) if name else None
        blocks[name] = Block(name, key, mode, exec_dev, streamed=mode in ("stream", "disk"))
        if parent is not None:
            blocks[name].out_device = _exec_of(parent, entries, modes, stream_dev)
        elif mode == "cpu":
            blocks[name].out_device = main
    for rec in tensors:
        home_dev = None if rec.home is None else blocks[rec.home].exec_device
        for bname in rec.refs:
            b = blocks[bname]
            if bname == rec.home:
                b.owned.append(rec)
            elif not (rec.home is not None and home_dev == b.exec_device and modes[rec.home] in ("gpu", "cpu")):
                b.borrowed.append(rec)
            if b.orig_dtype is None and rec.dtype.is_floating_point:
                b.orig_dtype = rec.dtype
    return blocks


def _exec_of(
    name: str, entries: dict[str, DeviceKey], modes: Mapping[str, str], stream_dev: torch.device
) -> torch.device:
    mode = modes[name]
    return _device_of(entries[name]) if mode == "gpu" else torch.device("cpu") if mode == "cpu" else stream_dev


# --------------------------------------------------------------------------------------------------------------
# reading the state


def memory_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Bytes per device key ("0", "1", "cpu", "disk") of a dispatched model.

    For each key: `blocks` (count), `placed` (weights held there: resident GPU/CPU weights, the packed host
    buffers of streamed blocks under "cpu", offload-file data under "disk"), `stream_slots` (the two streaming
    buffers on the execution device), under "cpu" `staging` (the two pinned read-ahead buffers of disk blocks,
    if any); for GPUs also the allocator's `allocated`, `peak_allocated` and `reserved` bytes.
    """
    rt: Runtime | None = getattr(model, "shardq_runtime", None)
    if rt is None:
        raise DispatchError("memory_report needs a model returned by shardq.dispatch_model or shardq.load_sharded")
    report: dict[str, dict[str, int]] = {}

    def row(key: Any) -> dict[str, int]:
        return report.setdefault(str(key), {"blocks": 0, "placed": 0, "stream_slots": 0})

    for b in rt.blocks.values():
        key = b.device if b.mode != "stream" else "cpu"
        row(key)["blocks"] += 1
        if not b.streamed:
            row(key)["placed"] += sum(r.tensor.numel() * r.tensor.element_size() for r in b.owned)
    if rt.streamer is not None:
        for blk in rt.streamer.blocks.values():  # the bytes really held: packed buffers, offload files
            row("disk" if isinstance(blk, DiskBlock) else "cpu")["placed"] += blk.nbytes
        key = rt.streamer.device.index if rt.streamer.device.type == "cuda" else "cpu"
        row(key)["stream_slots"] += sum(s.buffer.numel() for s in rt.streamer.slots)
        if rt.streamer.staging:
            row("cpu")["staging"] = sum(st.buffer.numel() for st in rt.streamer.staging)
    for key, vals in report.items():
        if key.isdigit():
            i = int(key)
            vals.update(
                allocated=torch.cuda.memory_allocated(i),
                peak_allocated=torch.cuda.max_memory_allocated(i),
                reserved=torch.cuda.memory_reserved(i),
            )
    return report


def format_memory_report(report: dict[str, dict[str, int]]) -> str:
    """A readable table of `memory_report(model)`."""
    cols = ["blocks", "placed", "stream_slots", "staging", "allocated", "peak_allocated", "reserved"]
    lines = [f"{'device':<8}" + "".join(f"{c:>16}" for c in cols)]
    for key, vals in report.items():
        cells = [str(vals[c]) if c == "blocks" else format_size(vals[c]) if c in vals else "-" for c in cols]
        lines.append(f"{key:<8}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def remove_dispatch(model: nn.Module) -> nn.Module:
    """Remove shardq's forward wrappers and stop the streamer; offloaded weights stay where they are."""
    rt: Runtime | None = getattr(model, "shardq_runtime", None)
    if rt is None:
        return model
    reset_graphs(model)
    for module, previous in reversed(rt.wrapped):
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    if rt.streamer is not None:
        rt.streamer.close()
    if rt.model_class is not None:
        model.__class__ = rt.model_class
    for attr in ("shardq_runtime", "shardq_device_map", "shardq_offload_modes"):
        delattr(model, attr)
    return model
