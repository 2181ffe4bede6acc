"""A safetensors header checked at least as strictly as the safetensors library checks it, from the header alone.

The rules are the library's (`safetensors` 0.x, Rust `SafeTensors::read_metadata` + `Metadata::validate`), with
shardq's errors naming the file and the tensor, plus two it lacks (duplicate JSON keys are refused where the
library keeps the last one silently):

- the header length is at most 100 MB and fits in the file; the header is UTF-8 JSON, one object;
- `__metadata__` is absent, null, or an object of strings to strings;
- every other key is a tensor: an object with `dtype` (one of the library's names that shardq reads), `shape`
  (a list of non-negative JSON integers, never floats, booleans or strings) and `data_offsets` (exactly two
  non-negative integers, begin ≤ end);
- its byte count is `prod(shape) * itemsize` (no overflow past 2^64);
- sorted by offset, the tensors tile the data section exactly: each begins where the previous ended (no overlap,
  no gap, no negative offset reaching into the header) and the last ends at the file's end (no trailing bytes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

MAX_HEADER_BYTES = 100_000_000  # the library's limit (HeaderTooLarge)
_U64 = 2**64

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


class HeaderError(ValueError):
    """A safetensors header that breaks the format's rules (raised as CheckpointError by the index)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a checked header; offsets are relative to the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"the key {k!r} appears twice in the header (a parser would silently keep one)")
        out[k] = v
    return out


def parse_json(raw: bytes, what: str) -> Any:
    """JSON with duplicate keys refused; `what` names the document in errors."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except HeaderError as e:
        raise HeaderError(f"{what}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"{what} is not valid JSON ({exc})") from None


def _is_uint(x: Any) -> bool:
    return type(x) is int and 0 <= x < _U64


def check_metadata(meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError(f"__metadata__ must be an object of strings to strings, got {str(meta)[:80]}")
    return dict(meta)


def check_entry(name: str, entry: Any) -> Entry:
    """One tensor's header entry, checked field by field."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise HeaderError(f"header entry for tensor {name!r} lacks dtype/shape/data_offsets")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise HeaderError(
            f"tensor {name!r} has dtype {entry['dtype']!r}, which shardq cannot read (supported: {sorted(DTYPES)})"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderError(f"tensor {name!r} has shape {shape!r}: a shape is a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(x) for x in offsets):
        raise HeaderError(
            f"tensor {name!r} has data_offsets {offsets!r}: they are two non-negative integers "
            "[begin, end] counted from the end of the header"
        )
    begin, end = offsets
    needed = math.prod(shape) * dtype.itemsize
    if needed >= _U64:
        raise HeaderError(f"tensor {name!r}: shape {shape} of {str(dtype)} overflows 64-bit byte counts")
    if end < begin or end - begin != needed:
        raise HeaderError(f"tensor {name!r} spans {end - begin} bytes but {str(dtype)} {shape} needs {needed}")
    return Entry(name, dtype, tuple(shape), begin, end)


def check_tiling(entries: list[Entry], data_bytes: int) -> None:
    """Sorted by offset, the tensors must cover the data section exactly once (the library's rule)."""
    cursor, prev = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != cursor:
            where = f"tensor {prev!r} ends at {cursor}" if prev is not None else "the data section starts at 0"
            kind = "overlaps the tensor before it" if e.begin < cursor else "leaves a gap of unused bytes"
            raise HeaderError(f"tensor {e.name!r} begins at byte {e.begin} but {where}: it {kind}")
        cursor, prev = e.end, e.name
    if cursor < data_bytes:
        raise HeaderError(
            f"the tensors cover {cursor} bytes of a {data_bytes}-byte data section: the file has "
            "trailing bytes no tensor owns"
        )


def check_header(raw: bytes, data_bytes: int | None) -> tuple[list[Entry], dict[str, str]]:
    """Every tensor of a header's JSON bytes and its metadata; `data_bytes` (the file's bytes after the header)
    is checked against the offsets when given (None: truncation is reported by the caller)."""
    header = parse_json(raw, "the safetensors header")
    if not isinstance(header, dict):
        raise HeaderError("the safetensors header is not a JSON object")
    meta = check_metadata(header.pop("__metadata__", None))
    entries = [check_entry(name, entry) for name, entry in header.items()]
    if data_bytes is not None:
        check_tiling(entries, data_bytes)
    return entries, meta
