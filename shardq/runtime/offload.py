"""Weight stores for offloaded blocks and the streamer that brings them to the execution device.

A *block* is one entry of a device map (a module and everything under it). An offloaded block's tensors live
either in one flat pinned host buffer (`HostBlock`, mode "stream") or in a safetensors file of the offload
folder (`DiskBlock`, mode "disk"). For each forward the `Streamer` copies a block's bytes in ONE transfer into
one of two preallocated slots on the execution device and hands out views of it, so the device never holds
more than two streamed blocks. On a GPU the copies run on a side stream: while block i computes, block i+1 is
already being copied (events order compute after copy, and a slot is only overwritten once the compute that
read it has finished). Disk blocks are read by a background thread into pinned staging buffers ahead of use.
Without a GPU the same code runs on the CPU with plain copies, so CI exercises it for real.

Nothing here depends on a quantization format: a block is a list of named tensors of any dtype.
"""

from __future__ import annotations

import json
import mmap
import os
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy
import torch

from shardq.checkpoint.index import DTYPES, CheckpointError, read_header
from shardq.runtime import offload_folder

ALIGN = 256  # bytes; every tensor of a packed block starts on this boundary (wide copies, aligned kernel loads)
INDEX_NAME = offload_folder.INDEX_NAME
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every GPU's context, not only the current one
INDEX_FORMAT = offload_folder.INDEX_FORMAT

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class OffloadError(ValueError):
    """A problem with offloaded weights (missing or damaged offload file, mismatched tensors)."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor of a block lies inside the block's flat byte buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class HostBlock:
    """A block held in one flat host buffer (pinned when a GPU will read it)."""

    name: str
    specs: list[TensorSpec]
    buffer: torch.Tensor  # uint8, flat

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


@dataclass
class DiskBlock:
    """A block stored as one safetensors file; `data_offset` is where its data section starts in the file."""

    name: str
    specs: list[TensorSpec]
    path: Path
    data_offset: int
    nbytes: int


Block = HostBlock | DiskBlock


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _round_up(n: int, k: int = ALIGN) -> int:
    return (n + k - 1) // k * k


def layout(tensors: Mapping[str, torch.Tensor]) -> tuple[list[TensorSpec], int]:
    """Aligned flat layout for `tensors` (in the given order): their specs and the total byte size."""
    specs, offset = [], 0
    for name, t in tensors.items():
        n = _nbytes(t)
        specs.append(TensorSpec(name, t.dtype, tuple(t.shape), offset, n))
        offset = _round_up(offset + n)
    return specs, offset


def views(buffer: torch.Tensor, specs: list[TensorSpec]) -> list[torch.Tensor]:
    """Typed, shaped views of a flat uint8 `buffer` laid out by `specs` (no copies)."""
    out = []
    for s in specs:
        if s.nbytes:
            out.append(buffer[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape))
        else:  # an empty tensor has no bytes to view
            out.append(torch.empty(s.shape, dtype=s.dtype, device=buffer.device))
    return out


@overload
def host_buffer(nbytes: int, pin: Literal[True]) -> tuple[torch.Tensor, numpy.ndarray]: ...
@overload
def host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, numpy.ndarray | None]: ...


def host_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, numpy.ndarray | None]:
    """A flat uint8 host buffer of exactly `nbytes`, and the array that owns its memory when it is to be pinned
    (page-aligned anonymous memory, pass both to `pin_buffer` once filled)."""
    nbytes = max(nbytes, 1)
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8), None
    owner = numpy.frombuffer(mmap.mmap(-1, nbytes), dtype=numpy.uint8)
    return torch.from_numpy(owner), owner


def pin_buffer(buffer: torch.Tensor, owner: numpy.ndarray) -> torch.Tensor:
    """Page-lock a filled `host_buffer` in place so a GPU reads it by DMA; returns the pinned buffer.

    torch's pinned allocator rounds every allocation up to a power of two (a 405 MB layer would take 512 MB
    of RAM), so the exact-size buffer is registered with `cudaHostRegister` instead (after it was filled:
    registering touched pages is cheaper) and unregistered when `owner`, which every view of the buffer keeps
    alive, goes away. If registration fails (or SHARDQ_PIN=torch), the data is copied into torch's pinned memory.
    """
    if os.environ.get("SHARDQ_PIN") == "torch":  # escape hatch: torch's (power-of-two rounded) pinned memory
        return buffer.pin_memory()
    cudart = torch.cuda.cudart()
    ptr, nbytes = buffer.data_ptr(), buffer.numel()
    registered = int(cudart.cudaHostRegister(ptr, nbytes, _HOST_REGISTER_PORTABLE)) == 0
    if registered and buffer.is_pinned():
        done = weakref.finalize(owner, cudart.cudaHostUnregister, ptr)
        done.atexit = False  # at exit the driver drops the registration itself
        return buffer
    if registered:
        cudart.cudaHostUnregister(ptr)
    return buffer.pin_memory()


def pack_host_block(name: str, tensors: Mapping[str, torch.Tensor], pin: bool) -> HostBlock:
    """Copy `tensors` into one flat host buffer (pinned if `pin`) and return the block.

    The caller re-points its parameters at `views(block.buffer, block.specs)` so the original storage is freed.
    """
    specs, total = layout(tensors)
    buffer, owner = host_buffer(total, pin)
    for spec, view, t in zip(specs, views(buffer, specs), tensors.values()):
        if spec.nbytes:
            view.copy_(t.detach())
    return HostBlock(name, specs, pin_buffer(buffer, owner) if owner is not None else buffer)


# --------------------------------------------------------------------------------------------------------------
# disk offload folder: one safetensors file per block plus index.json


def write_disk_offload(offload_dir: str | os.PathLike, module_name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write one block's tensors (names relative to the block module) to the offload folder and index them.

    The loader calls this for every block planned on "disk" (through the folder it claimed, see
    `shardq.runtime.offload_folder`); `dispatch_model` reads the folder back. The file is a plain safetensors
    file written under a unique temporary name and renamed into place; the index maps block names to files and
    tensor dtypes/shapes. A folder that a live load owns, or that a finished load left, is refused.
    """
    bad = [k for k, t in tensors.items() if t.device.type == "meta"]
    if bad:
        raise OffloadError(
            f"cannot write block {module_name!r} to disk: tensors {bad} are on the meta device (not loaded)"
        )
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    live = offload_folder.live_folder(offload_dir)
    if live is not None:
        return live.write_block(module_name, cpu, _DTYPE_NAMES, INDEX_FORMAT)
    folder = Path(offload_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = offload_folder.lock_folder(folder)  # another live load holds it: refused; two writers never interleave
    try:
        index: dict[str, Any] = (
            read_disk_index(folder) if (folder / INDEX_NAME).exists() else {"format": INDEX_FORMAT, "blocks": {}}
        )
        path = folder / offload_folder.block_file(module_name)
        offload_folder.atomic_save_safetensors(path, cpu, {"format": INDEX_FORMAT, "block": module_name})
        index["blocks"][module_name] = {
            "file": path.name,
            "tensors": {k: {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for k, t in cpu.items()},
        }
        offload_folder.atomic_write_bytes(folder / INDEX_NAME, json.dumps(index, indent=1).encode())
    finally:
        os.close(fd)
    return path


def read_disk_index(offload_dir: str | os.PathLike) -> dict:
    """The offload folder's index (block name → file and tensor dtypes/shapes). A folder owned by a load
    (`offload_folder.claim_folder`) is readable only by that load while it runs: another model must never pick
    up its blocks."""
    path = Path(offload_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise OffloadError(
            f"offload folder {offload_dir} has no {INDEX_NAME}; write blocks with write_disk_offload"
        ) from None
    except json.JSONDecodeError as e:
        raise OffloadError(f"{path} is not valid JSON ({e}); delete the offload folder and load again") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("blocks"), dict):
        raise OffloadError(
            f"{path} is not a shardq offload index (format "
            f"{index.get('format') if isinstance(index, dict) else None!r})"
        )
    if offload_folder.is_owned_index(index):
        live = offload_folder.live_folder(offload_dir)
        if live is None or live.sealed:
            raise OffloadError(
                f"offload folder {offload_dir} holds the disk blocks of another load "
                f"(owner: {index['owner']}): they are never reused by another model; pass another "
                "offload_dir, or load into this one with load_sharded (it cleans it first)"
            )
    return index


def open_disk_block(offload_dir: str | os.PathLike, module_name: str) -> DiskBlock:
    """Parse and check a block's safetensors header (dtypes, shapes, file size) without reading its data."""
    index = read_disk_index(offload_dir)
    entry = index["blocks"].get(module_name)
    if entry is None:
        raise OffloadError(
            f"block {module_name!r} is not in {Path(offload_dir) / INDEX_NAME}; it holds {sorted(index['blocks'])}"
        )
    path = Path(offload_dir) / entry["file"]
    try:
        tensors, _ = read_header(path)
    except CheckpointError as e:
        raise OffloadError(
            f"offload file of block {module_name!r}: {e} (here: delete the offload folder and load again)"
        ) from None
    infos = sorted(tensors.values(), key=lambda t: t.start)
    base = min((t.start for t in infos), default=0)
    specs = []
    for t in infos:
        if (t.start - base) % t.dtype.itemsize:
            raise OffloadError(
                f"tensor {t.name!r} in {path} is not aligned to its dtype; rewrite it with write_disk_offload"
            )
        specs.append(TensorSpec(t.name, t.dtype, t.shape, t.start - base, t.end - t.start))
    end = max((t.end for t in infos), default=base) - base
    return DiskBlock(module_name, specs, path, base, end)


def read_block_into(block: DiskBlock, out: torch.Tensor, wait: torch.cuda.Event | None = None) -> torch.Tensor:
    """Read a disk block's data section into the flat uint8 host tensor `out` (after `wait`, if given)."""
    if wait is not None:
        wait.synchronize()
    target = out[: block.nbytes].numpy()
    with open(block.path, "rb") as f:
        f.seek(block.data_offset)
        got = f.readinto(memoryview(target))
    if got != block.nbytes:
        raise OffloadError(f"offload file {block.path} is truncated: read {got} of {block.nbytes} bytes")
    return out


# --------------------------------------------------------------------------------------------------------------
# the streamer


@dataclass
class _Slot:
    buffer: torch.Tensor
    owner: str | None = None
    busy: bool = False
    last_use: int = 0
    ready: torch.cuda.Event | None = None  # copy into the slot done (GPU)
    free: torch.cuda.Event | None = None  # compute reading the slot done (GPU)
    free_recorded: bool = False


@dataclass
class _Staging:
    buffer: torch.Tensor
    free: torch.cuda.Event | None = None  # H2D copy out of it done
    free_recorded: bool = False


@dataclass
class Streamer:
    """Brings offloaded blocks to `device`, two slots deep, with prefetch of the predicted next block.

    Use: `add(block)` for every offloaded block, `allocate()` once, then around each block's forward
    `acquire(name)` (typed views on `device`) and `release(name)`.
    """

    device: torch.device
    prefetch: bool = True
    blocks: dict[str, Block] = field(default_factory=dict)
    slots: list[_Slot] = field(default_factory=list)
    staging: list[_Staging] = field(default_factory=list)
    successor: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"copies": 0, "bytes": 0, "prefetched": 0, "disk_reads": 0})
    _last: str | None = None
    _next_registered: dict[str, str] = field(default_factory=dict)
    _clock: int = 0
    _reads: dict[str, tuple[Future, int]] = field(default_factory=dict)
    _reader: ThreadPoolExecutor | None = None
    _stream: torch.cuda.Stream | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def add(self, block: Block) -> None:
        self.blocks[block.name] = block

    def slot_bytes(self) -> int:
        """Bytes of one slot: the largest streamed block."""
        return max((b.nbytes for b in self.blocks.values()), default=0)

    def allocate(self) -> None:
        """Allocate the two device slots (and pinned staging for disk blocks) once, up front."""
        nbytes = _round_up(max(self.slot_bytes(), 1))
        self.slots = [_Slot(torch.empty(nbytes, dtype=torch.uint8, device=self.device)) for _ in range(2)]
        disk = [b.nbytes for b in self.blocks.values() if isinstance(b, DiskBlock)]
        if disk:
            self.staging = [_Staging(self._staging_buffer(max(disk))) for _ in range(2)]
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardq-disk")
        if self.cuda:
            self._stream = torch.cuda.Stream(self.device)
            for s in self.slots:
                s.ready, s.free = torch.cuda.Event(), torch.cuda.Event()
            for st in self.staging:
                st.free = torch.cuda.Event()

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        buffer, owner = host_buffer(nbytes, self.cuda)
        if owner is not None:  # pinned: self.cuda
            buffer.fill_(0)  # touch the pages before they are locked
            buffer = pin_buffer(buffer, owner)
        return buffer

    def close(self) -> None:
        """Stop the disk reader and drop the slots."""
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        self._reader, self.slots, self.staging, self._reads = None, [], [], {}

    # ---- prediction

    def predict(self, name: str) -> str:
        """The block expected after `name`: the one seen after it last time, else the next registered one."""
        if name in self.successor:
            return self.successor[name]
        if len(self._next_registered) != len(self.blocks):
            order = list(self.blocks)
            self._next_registered = {a: b for a, b in zip(order, order[1:] + order[:1])}
        return self._next_registered[name]

    # ---- forward interface

    def acquire(self, name: str) -> list[torch.Tensor]:
        """Views of block `name` on the device, valid until `release(name)`; starts prefetching the next block."""
        if self._last is not None and self._last != name:
            self.successor[self._last] = name
        self._last = name
        self._clock += 1
        slot = self._slot_of(name)
        if slot is None:
            slot = self._free_slot()
            self._load(name, slot)
            assert slot is not None  # _load raised otherwise
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        slot.busy, slot.last_use = True, self._clock
        if self.prefetch and len(self.blocks) > 1:
            self._prefetch_after(name)
        return views(slot.buffer, self.blocks[name].specs)

    def release(self, name: str) -> None:
        """Mark block `name`'s slot reusable once the compute queued so far has finished."""
        slot = self._slot_of(name)
        if slot is None or not slot.busy:
            return
        if self.cuda:
            assert slot.free is not None  # allocate() made the events of every slot on a GPU
            slot.free.record(torch.cuda.current_stream(self.device))
            slot.free_recorded = True
        slot.busy = False
        if self.prefetch and len(self.blocks) > 1:
            nxt = self.predict(name)
            if self._slot_of(nxt) is None and self._host_ready(nxt):
                self._try_load(nxt)

    # ---- internals

    def _slot_of(self, name: str) -> _Slot | None:
        return next((s for s in self.slots if s.owner == name), None)

    def _free_slot(self) -> _Slot | None:
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        return min(free, key=lambda s: (s.owner is not None, s.last_use))

    def _prefetch_after(self, name: str) -> None:
        nxt = self.predict(name)
        if nxt != name and self._slot_of(nxt) is None:
            if self._host_ready(nxt):
                self._try_load(nxt)
            else:
                self._start_read(nxt)
        after = self.predict(nxt)
        if after not in (name, nxt):
            self._start_read(after)

    def _try_load(self, name: str) -> None:
        slot = self._free_slot()
        if slot is not None:
            self._load(name, slot)
            self.stats["prefetched"] += 1

    def _host_ready(self, name: str) -> bool:
        block = self.blocks[name]
        if isinstance(block, HostBlock):
            return True
        pending = self._reads.get(name)
        return pending is not None and pending[0].done()

    def _start_read(self, name: str) -> None:
        block = self.blocks.get(name)
        if not isinstance(block, DiskBlock) or name in self._reads or self._slot_of(name) is not None:
            return
        used = {idx for _, idx in self._reads.values()}
        idx = next((i for i in range(len(self.staging)) if i not in used), None)
        if idx is None:
            return
        st = self.staging[idx]
        wait = st.free if (self.cuda and st.free_recorded) else None
        assert self._reader is not None  # allocate() started it with the staging buffers
        self._reads[name] = (self._reader.submit(read_block_into, block, st.buffer, wait), idx)
        self.stats["disk_reads"] += 1

    def _host_buffer(self, name: str) -> tuple[torch.Tensor, _Staging | None]:
        block = self.blocks[name]
        if isinstance(block, HostBlock):
            return block.buffer, None
        if name not in self._reads:
            self._start_read(name)
        if name not in self._reads:  # both staging buffers hold pending reads: wait for the older one
            oldest = next(iter(self._reads))
            self._reads[oldest][0].result()
            self._reads.pop(oldest)
            self._start_read(name)
        future, idx = self._reads.pop(name)
        return future.result(), self.staging[idx]

    def _load(self, name: str, slot: _Slot | None) -> None:
        if slot is None:
            raise RuntimeError(
                f"cannot stream block {name!r}: both streaming slots are in use by running blocks "
                "(streamed blocks must not be nested in each other)"
            )
        host, staging = self._host_buffer(name)
        n = self.blocks[name].nbytes
        if self.cuda:
            # allocate() made the stream and the events of every slot and staging buffer on a GPU
            assert self._stream is not None and slot.ready is not None
            with torch.cuda.stream(self._stream):
                if slot.free_recorded:
                    self._stream.wait_event(slot.free)
                slot.buffer[:n].copy_(host[:n], non_blocking=True)
                slot.ready.record(self._stream)
                if staging is not None:
                    assert staging.free is not None
                    staging.free.record(self._stream)
                    staging.free_recorded = True
        else:
            slot.buffer[:n].copy_(host[:n])
        slot.owner = name
        self.stats["copies"] += 1
        self.stats["bytes"] += n
