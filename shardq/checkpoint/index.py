"""Safetensors checkpoints read by header only: an index of every tensor's file, dtype, shape and byte range.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data; offsets
count from the end of the header. `index_checkpoint` reads only those headers (no weight bytes) for a file or a
directory (single `model.safetensors`, sharded with `model.safetensors.index.json`, or several files without an
index) and checks that every file is long enough for its offsets and that the index points at real files and
tensors, so a truncated download fails before anything is allocated. `read_tensor` then reads one tensor's
bytes. Nothing is ever unpickled.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardq.checkpoint.header import DTYPES, MAX_HEADER_BYTES, HeaderError, check_header, check_tiling, parse_json  # noqa: F401  (DTYPES re-exported)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, inconsistent or not safetensors."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `start`/`end` are absolute byte offsets in `file`."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class CheckpointIndex:
    """Every tensor of a checkpoint by name, the files it spans, and their `__metadata__` merged."""

    path: str
    tensors: dict[str, TensorInfo]
    files: list[str]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype_counts(self) -> dict[torch.dtype, int]:
        """Bytes held per dtype, to tell the checkpoint's working dtype."""
        out: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return out

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors.values())


def read_header(file: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors and `__metadata__` of one safetensors file, from its header alone, checked as strictly as the
    safetensors library checks it (`shardq.checkpoint.header`) and against the file's size."""
    path = os.fspath(file)
    if not os.path.isfile(path):
        raise CheckpointError(f"safetensors file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{path} is {size} bytes, too short for a safetensors header: the file is truncated "
                "or not safetensors; download or save it again"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} does not fit in the file's {size} bytes (at most "
                f"{MAX_HEADER_BYTES}): the file is truncated or not safetensors; download or save "
                "it again"
            )
        raw = f.read(n)
    base = 8 + n
    try:
        entries, metadata = check_header(raw, None)
        for e in entries:
            if base + e.end > size:
                raise CheckpointError(
                    f"{path} is truncated: tensor {e.name!r} ends at byte {base + e.end} but the "
                    f"file has {size} bytes; download or save the checkpoint again"
                )
        check_tiling(entries, size - base)
    except HeaderError as e:
        raise CheckpointError(f"{path}: {e}; the file is corrupt or crafted, not a valid safetensors file") from None
    tensors = {e.name: TensorInfo(e.name, path, e.dtype, e.shape, base + e.begin, base + e.end) for e in entries}
    return tensors, metadata


def index_checkpoint(path: str | os.PathLike) -> CheckpointIndex:
    """Index a safetensors file or a checkpoint directory, reading headers only."""
    p = Path(path)
    if p.is_file():
        tensors, meta = read_header(p)
        return CheckpointIndex(str(p), tensors, [str(p)], meta)
    if not p.is_dir():
        raise CheckpointError(
            f"checkpoint {p} does not exist: give a directory with config.json and safetensors "
            "files, or a .safetensors file"
        )
    if (p / INDEX_NAME).is_file():
        return _index_sharded(p, p / INDEX_NAME)
    if (p / SINGLE_NAME).is_file():
        tensors, meta = read_header(p / SINGLE_NAME)
        return CheckpointIndex(str(p), tensors, [str(p / SINGLE_NAME)], meta)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(f.name for f in p.iterdir())[:10]) or "nothing"
        raise CheckpointError(
            f"{p} holds no safetensors checkpoint (found: {found}); shardq reads only "
            f"safetensors ({SINGLE_NAME} or shards with {INDEX_NAME}), never pickle files: "
            "convert .bin checkpoints with save_pretrained(..., safe_serialization=True)"
        )
    return _merge(p, files)


def _merge(root: Path, files: Iterable[Path]) -> CheckpointIndex:
    tensors: dict[str, TensorInfo] = {}
    meta: dict[str, str] = {}
    names = []
    for f in files:
        part, m = read_header(f)
        for name, info in part.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} is in both {tensors[name].file} and {f}: a checkpoint "
                    "directory must hold each tensor once; remove the stray file"
                )
            tensors[name] = info
        meta.update(m)
        names.append(str(f))
    return CheckpointIndex(str(root), tensors, names, meta)


def _read_weight_map(index_file: Path) -> dict[str, str]:
    """The index's `weight_map`: an object of tensor names to file names, duplicate keys refused."""
    try:
        index = parse_json(index_file.read_bytes(), str(index_file))
    except HeaderError as e:
        raise CheckpointError(f"{e}: not a valid index; download the checkpoint again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index_file} is not a valid index (needs a 'weight_map' object of tensor names to "
            f"shard file names, got {type(weight_map).__name__})"
        )
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(
            f"{index_file}: weight_map entry {bad[0][0]!r} -> {bad[0][1]!r} is not a file name "
            f"({len(bad)} such entries); the index is corrupt"
        )
    return weight_map


def confined(root: Path, name: str, what: str) -> Path:
    """`root / name` after checking that it stays inside the checkpoint folder: a relative path without `..`,
    whose real path (symlinks resolved) is inside `root`, or, for the Hugging Face cache's layout
    (`<repo>/snapshots/<rev>/file` -> `<repo>/blobs/<hash>`), inside that repository's `blobs` folder."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name or not rel.parts:
        raise CheckpointError(
            f"{what} names {name!r}, a path outside the checkpoint folder {root}: a checkpoint may "
            "only point at files inside its own folder (relative, no '..'); refusing to read it"
        )
    path = root / rel
    real, home = os.path.realpath(path), os.path.realpath(root)
    allowed = [home]
    if root.parent.name == "snapshots":
        allowed.append(os.path.realpath(root.parent.parent / "blobs"))
    if not any(os.path.commonpath([real, a]) == a for a in allowed):
        raise CheckpointError(
            f"{what} names {name!r}, which resolves to {real}, outside the checkpoint folder "
            f"{root} (a symlink leading out of it): refusing to read it; copy the shards into the "
            "folder if this link is yours"
        )
    return path


def _index_sharded(root: Path, index_file: Path) -> CheckpointIndex:
    weight_map = _read_weight_map(index_file)
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    for fname in by_file:
        confined(root, fname, f"{index_file.name} (tensor {by_file[fname][0]!r})")
    missing = [f for f in by_file if not (root / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_file} points at missing shard(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}: download the complete checkpoint"
        )
    tensors: dict[str, TensorInfo] = {}
    meta: dict[str, str] = {}
    for fname, names in by_file.items():
        part, m = read_header(root / fname)
        absent = [n for n in names if n not in part]
        if absent:
            raise CheckpointError(
                f"{index_file} says tensor {absent[0]!r} is in {fname}, but that file has no such "
                f"tensor ({len(absent)} missing): the index and the shards disagree; download again"
            )
        for n in names:
            tensors[n] = part[n]
        meta.update(m)
    files = [str(root / f) for f in by_file]
    return CheckpointIndex(str(root), dict(sorted(tensors.items())), files, meta)


def read_tensor(info: TensorInfo, device: torch.device | str | None = None) -> torch.Tensor:
    """Read one tensor's bytes (and nothing else) from its file into a new CPU tensor, then move it to `device`."""
    with open(info.file, "rb") as f:
        f.seek(info.start)
        buf = bytearray(info.nbytes)
        got = f.readinto(buf)
    if got != info.nbytes:
        raise CheckpointError(
            f"{info.file} is truncated: tensor {info.name!r} needs bytes {info.start}..{info.end} "
            f"but only {got} could be read; download or save the checkpoint again"
        )
    if info.nbytes == 0:
        t = torch.empty(info.shape, dtype=info.dtype)
    else:
        t = torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
    return t if device is None else t.to(device)
