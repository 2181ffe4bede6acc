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

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# A header larger than this is a corrupt file, not a checkpoint (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 2**20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


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
    """The tensors and `__metadata__` of one safetensors file, from its header alone, checked against its size."""
    path = os.fspath(file)
    if not os.path.isfile(path):
        raise CheckpointError(f"safetensors file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is {size} bytes, too short for a safetensors header: the file is truncated "
                                  "or not safetensors; download or save it again")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit in the file's {size} bytes: the file is "
                                  "truncated or not safetensors; download or save it again")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = {name: _tensor_info(path, name, entry, base, size) for name, entry in header.items()}
    return tensors, dict(metadata)


def _tensor_info(path: str, name: str, entry: object, base: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(
            f"{path}: header entry for tensor {name!r} lacks dtype/shape/data_offsets; the file is corrupt")
    dtype = DTYPES.get(str(entry["dtype"]))
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, which shardq cannot read "
                              f"(supported: {sorted(DTYPES)})")
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (int(x) for x in entry["data_offsets"])
    expected = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != expected:
        raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but {str(dtype)} {list(shape)} "
                              f"needs {expected}; the file is corrupt")
    if base + end > size:
        raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {base + end} but the file has "
                              f"{size} bytes; download or save the checkpoint again")
    return TensorInfo(name, path, dtype, shape, base + begin, base + end)


def index_checkpoint(path: str | os.PathLike) -> CheckpointIndex:
    """Index a safetensors file or a checkpoint directory, reading headers only."""
    p = Path(path)
    if p.is_file():
        tensors, meta = read_header(p)
        return CheckpointIndex(str(p), tensors, [str(p)], meta)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist: give a directory with config.json and safetensors "
                              "files, or a .safetensors file")
    if (p / INDEX_NAME).is_file():
        return _index_sharded(p, p / INDEX_NAME)
    if (p / SINGLE_NAME).is_file():
        tensors, meta = read_header(p / SINGLE_NAME)
        return CheckpointIndex(str(p), tensors, [str(p / SINGLE_NAME)], meta)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(f.name for f in p.iterdir())[:10]) or "nothing"
        raise CheckpointError(f"{p} holds no safetensors checkpoint (found: {found}); shardq reads only "
                              f"safetensors ({SINGLE_NAME} or shards with {INDEX_NAME}), never pickle files: "
                              "convert .bin checkpoints with save_pretrained(..., safe_serialization=True)")
    return _merge(p, files)


def _merge(root: Path, files: Iterable[Path]) -> CheckpointIndex:
    tensors: dict[str, TensorInfo] = {}
    meta: dict[str, str] = {}
    names = []
    for f in files:
        part, m = read_header(f)
        for name, info in part.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is in both {tensors[name].file} and {f}: a checkpoint "
                                      "directory must hold each tensor once; remove the stray file")
            tensors[name] = info
        meta.update(m)
        names.append(str(f))
    return CheckpointIndex(str(root), tensors, names, meta)


def _index_sharded(root: Path, index_file: Path) -> CheckpointIndex:
    try:
        index = json.loads(index_file.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_file} is not a valid index (needs a 'weight_map' object): {exc}") from None
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    missing = [f for f in by_file if not (root / f).is_file()]
    if missing:
        raise CheckpointError(f"{index_file} points at missing shard(s) {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}: download the complete checkpoint")
    tensors: dict[str, TensorInfo] = {}
    meta: dict[str, str] = {}
    for fname, names in by_file.items():
        part, m = read_header(root / fname)
        absent = [n for n in names if n not in part]
        if absent:
            raise CheckpointError(f"{index_file} says tensor {absent[0]!r} is in {fname}, but that file has no such "
                                  f"tensor ({len(absent)} missing): the index and the shards disagree; download again")
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
        raise CheckpointError(f"{info.file} is truncated: tensor {info.name!r} needs bytes {info.start}..{info.end} "
                              f"but only {got} could be read; download or save the checkpoint again")
    if info.nbytes == 0:
        t = torch.empty(info.shape, dtype=info.dtype)
    else:
        t = torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
    return t if device is None else t.to(device)
