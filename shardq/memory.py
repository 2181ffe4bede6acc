"""Memory budgets: size strings, device keys, and the default `max_memory` of this machine.

Sizes parse exactly as accelerate/transformers parse them, so a user's existing `max_memory` dict means the
same thing here: ints are bytes, "600MB" is 600*10^6, "1.5GiB" is 1.5*2^30, and a lowercase trailing "b"
("10Gb") means bits. Device keys follow accelerate: a GPU is its int index, plus "cpu" and "disk".

Default budgets (`max_memory=None`): each GPU's free memory read through NVML (no CUDA context is created),
falling back to `torch.cuda.mem_get_info` when NVML is missing or fails, minus `GPU_MARGIN`; the host's
available memory (psutil) times `HOST_FRACTION`; the free space of the offload folder for "disk".
Nothing here initialises CUDA at import.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

DeviceKey = int | str

# Kept free on every GPU when budgets are detected: the CUDA context (~300-500 MB on recent GPUs), cuBLAS
# and kernel workspaces, and allocator fragmentation. A user's explicit max_memory is taken as is.
GPU_MARGIN = 768 * 2**20
# Share of the host's available memory a detected "cpu" budget may use: the rest stays for the OS, the
# Python process itself and the page cache that memory-mapped safetensors reads go through.
HOST_FRACTION = 0.9

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*$")
_FORMS = (
    "accepted forms: a non-negative int of bytes, or a number with a unit such as '600MB' (10^6), '1GB' (10^9), "
    "'1.5GiB' (2^30), '512KiB', '2TB'; units are case-insensitive except a lowercase trailing 'b' "
    "('10Gb'), which means bits as in accelerate"
)


def parse_size(value: Any) -> int:
    """Bytes from an int or a size string as accelerate reads it ("600MB", "1.5GiB", "10Gb" = bits)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"size {value!r} is not a size: {_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value!r} is negative: {_FORMS}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"size {value!r} is not a finite non-negative number: {_FORMS}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"size {value!r} of type {type(value).__name__} is not a size: {_FORMS}")
    if value.strip().startswith("-"):
        raise ValueError(f"size {value!r} is negative: {_FORMS}")
    m = _SIZE_RE.match(value)
    if m is None:
        raise ValueError(f"size {value!r} cannot be read: {_FORMS}")
    number, exponent, unit = m.groups()
    key = unit.lower()
    if key not in _UNITS:
        raise ValueError(f"size {value!r} has an unknown unit {unit!r}: {_FORMS}")
    amount = float(number) * (10 ** int(exponent) if exponent else 1)
    nbytes = int(amount * _UNITS[key])
    if unit.endswith("b") and key in ("kb", "mb", "gb", "tb"):
        nbytes //= 8  # accelerate: a lowercase "b" after a decimal prefix means bits
        _warn(
            f"size {value!r} ends in a lowercase 'b', which means bits (as in accelerate): read as "
            f"{nbytes} bytes ({format_size(nbytes)}); write '{number}{unit[:-1].upper()}B' if you meant bytes"
        )
    elif not unit:
        _warn(
            f"size {value!r} has no unit, so it is {nbytes} bytes (as in accelerate); write e.g. "
            f"'{number}GB' or '{number}GiB' for gigabytes"
        )
    return nbytes


class SizeWarning(UserWarning):
    """A size string that parses, but probably not as meant (no unit, or a lowercase 'b' meaning bits)."""


def _warn(message: str) -> None:
    warnings.warn(message, SizeWarning, stacklevel=3)


def format_size(nbytes: float) -> str:
    """A short human size in binary units ("1.50 GiB"), for tables and error messages."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def device_label(device: DeviceKey) -> str:
    """How errors and tables name a device: "GPU 0", "cpu", "disk"."""
    return f"GPU {device}" if isinstance(device, int) else str(device)


def gpu_count() -> int:
    """Number of visible CUDA GPUs; torch counts them through NVML without initialising CUDA."""
    try:
        return int(torch.cuda.device_count())
    except Exception:  # a broken driver means no usable GPU, not a crash of the planner
        return 0


def normalize_device(key: Any, num_gpus: int | None = None) -> DeviceKey:
    """An accelerate device key (int GPU index, "cpu" or "disk") from int, "0", "cuda:1", torch.device, "cpu", "disk".

    `num_gpus` is the number of GPUs that exist (detected when None); a GPU index beyond it is an error
    that lists the GPUs that do exist.
    """
    index = _gpu_index(key)
    if index is None:
        return str(key).strip().lower() if not isinstance(key, torch.device) else key.type
    count = gpu_count() if num_gpus is None else num_gpus
    if index >= count:
        have = ", ".join(str(i) for i in range(count)) if count else "none"
        raise ValueError(
            f"GPU {key!r} does not exist: the GPUs here are [{have}]; use one of those indices, "
            "'cpu' or 'disk' (or give hypothetical GPUs to plan for another machine)"
        )
    return index


def _gpu_index(key: Any) -> int | None:
    """The GPU index named by `key`, None for "cpu"/"disk"; ValueError for anything else."""
    if isinstance(key, bool):
        raise ValueError(f"device key {key!r} is a bool: use a GPU index (0, 'cuda:1'), 'cpu' or 'disk'")
    if isinstance(key, torch.device):
        if key.type == "cuda":
            return key.index or 0
        if key.type == "cpu":
            return None
        raise ValueError(f"device {key} is not supported: use a CUDA GPU, 'cpu' or 'disk'")
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"GPU index {key} is negative: use 0, 1, ... or 'cpu' / 'disk'")
        return key
    if isinstance(key, str):
        k = key.strip().lower()
        if k in ("cpu", "disk"):
            return None
        if k == "cuda":
            return 0
        m = re.fullmatch(r"(?:cuda:)?([0-9]+)", k)
        if m:
            return int(m.group(1))
    raise ValueError(
        f"device key {key!r} is not understood: use a GPU index (0, '1', 'cuda:1', "
        "torch.device('cuda:0')), 'cpu' or 'disk'"
    )


def parse_gpus(spec: Any) -> list[int]:
    """Capacities of hypothetical GPUs: "2x24GB", "24GB,16GB", a list of sizes, or an int count of 80GB GPUs."""
    if isinstance(spec, str):
        out: list[int] = []
        for part in (p.strip() for p in spec.split(",")):
            m = re.fullmatch(r"([0-9]+)\s*[xX*]\s*(.+)", part)
            count, size = (int(m.group(1)), m.group(2)) if m else (1, part)
            if count < 1:
                raise ValueError(f"GPU spec {spec!r} asks for {count} GPUs: use e.g. '2x24GB' or '24GB,16GB'")
            out += [parse_size(size)] * count
        return out
    if isinstance(spec, Sequence):
        return [parse_size(s) for s in spec]
    raise ValueError(f"GPU spec {spec!r} is not understood: use e.g. '2x24GB', '24GB,16GB' or a list of sizes")


def gpu_free_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of GPU `index`: NVML first (no CUDA context), else torch.cuda.mem_get_info."""
    try:
        return _nvml_free(index)
    except Exception as nvml_error:  # NVML missing, driver mismatch, or no permission: ask the CUDA runtime
        try:
            free, total = torch.cuda.mem_get_info(index)
        except Exception as cuda_error:
            raise ValueError(
                f"cannot read the free memory of GPU {index} (NVML: {nvml_error}; CUDA: {cuda_error}): "
                "pass max_memory explicitly, e.g. {0: '20GiB', 'cpu': '64GiB'}"
            ) from None
        return int(free), int(total)


def _nvml_free(index: int) -> tuple[int, int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = _nvml_handle(pynvml, index)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.free), int(info.total)
    finally:
        pynvml.nvmlShutdown()


def _nvml_handle(pynvml: Any, index: int) -> Any:
    """NVML's handle for CUDA index `index`, honouring CUDA_VISIBLE_DEVICES (indices or GPU-UUIDs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    entry = entries[index]
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)


def host_available_memory() -> int:
    """Bytes of host memory available to new allocations (psutil)."""
    import psutil

    return int(psutil.virtual_memory().available)


def disk_free(path: str | os.PathLike | None = None) -> int:
    """Free bytes on the filesystem of `path` (the offload folder; the working directory when None)."""
    target = os.fspath(path) if path is not None else os.getcwd()
    while target and not os.path.exists(target):
        target = os.path.dirname(target.rstrip(os.sep)) or os.sep
    return int(shutil.disk_usage(target or os.getcwd()).free)


def get_max_memory(
    max_memory: Mapping[Any, Any] | None = None,
    *,
    gpus: Any = None,
    gpu_margin: int = GPU_MARGIN,
    host_fraction: float = HOST_FRACTION,
    offload_dir: str | os.PathLike | None = None,
) -> dict[DeviceKey, int]:
    """Budgets in bytes keyed by GPU index, "cpu" and "disk", GPUs first in index order.

    With `max_memory`, its keys are normalised, its sizes parsed, and only the devices it names are used.
    Without it, every GPU gets its free memory minus `gpu_margin`, "cpu" gets `host_fraction` of the
    available host memory and "disk" the free space of `offload_dir`. `gpus` plans for hypothetical GPUs
    ("2x24GB", a list of sizes): they replace the machine's GPUs, and their capacity minus the margin is
    their default budget.
    """
    hypothetical = parse_gpus(gpus) if gpus is not None else None
    num_gpus = len(hypothetical) if hypothetical is not None else None
    if max_memory is not None:
        if not isinstance(max_memory, Mapping):
            raise ValueError(
                f"max_memory must be a dict such as {{0: '10GiB', 'cpu': '30GiB'}}, not {type(max_memory).__name__}"
            )
        budgets: dict[DeviceKey, int] = {}
        for key, value in max_memory.items():
            dev = normalize_device(key, num_gpus)
            if dev in budgets:
                raise ValueError(f"max_memory names device {dev!r} twice (as {key!r}): give each device once")
            try:
                budgets[dev] = parse_size(value)
            except ValueError as exc:
                raise ValueError(f"max_memory[{key!r}]: {exc}") from None
        return _ordered(budgets)
    budgets = {}
    if hypothetical is not None:
        for i, cap in enumerate(hypothetical):
            budgets[i] = max(0, cap - gpu_margin)
    else:
        for i in range(gpu_count()):
            free, _total = gpu_free_memory(i)
            budgets[i] = max(0, free - gpu_margin)
    budgets["cpu"] = int(host_available_memory() * host_fraction)
    budgets["disk"] = disk_free(offload_dir)
    return budgets


def _ordered(budgets: dict[DeviceKey, int]) -> dict[DeviceKey, int]:
    gpus = sorted(k for k in budgets if isinstance(k, int))
    return {**{k: budgets[k] for k in gpus}, **{k: budgets[k] for k in ("cpu", "disk") if k in budgets}}


def device_capacities(gpus: Any = None) -> dict[int, int]:
    """Total memory of each GPU: the hypothetical `gpus` ("2x24GB") when given, else the machine's (none without
    CUDA). A cap in max_memory above these is clipped (`clip_budgets`)."""
    if gpus is not None:
        return dict(enumerate(parse_gpus(gpus)))
    out = {}
    for i in range(gpu_count()):
        try:
            out[i] = gpu_free_memory(i)[1]
        except ValueError:  # its memory cannot be read: the cap given is taken as is
            continue
    return out


def clip_budgets(
    budgets: dict[DeviceKey, int], capacities: Mapping[int, int], given: bool
) -> tuple[dict[DeviceKey, int], list[str]]:
    """Budgets no larger than the devices that hold them, and notes saying what was changed or left out.

    A GPU cap above the GPU's total memory is clipped to that total (the plan never counts memory that does not
    exist). With an explicit max_memory (`given`), a GPU it leaves out is not used, as accelerate does: noted.
    """
    out, notes = dict(budgets), []
    for dev, cap in budgets.items():
        if isinstance(dev, int) and dev in capacities and cap > capacities[dev]:
            out[dev] = capacities[dev]
            notes.append(
                f"max_memory for GPU {dev} ({format_size(cap)}) is more than the GPU's "
                f"{format_size(capacities[dev])}: clipped to {format_size(capacities[dev])}"
            )
    left_out = sorted(g for g in capacities if g not in budgets)
    if given and left_out:
        notes.append(
            f"GPU(s) {left_out} are not in max_memory and are not used (only the devices max_memory names "
            "are, as in accelerate): add them to max_memory to use them"
        )
    return out, notes
