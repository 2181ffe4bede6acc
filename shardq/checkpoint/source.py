"""Where each tensor's bytes come from: a safetensors checkpoint read lazily by byte range, or a model's own
weights. Both the planner (checkpoint shapes) and the loader (bytes) read tensors through these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shardq.checkpoint.index import CheckpointIndex, TensorInfo, read_tensor


class LoadError(ValueError):
    """A checkpoint that does not fit the model, or a load that cannot start; raised before anything is placed."""


@dataclass(frozen=True)
class SourceTensor:
    """One tensor to load: its name in the source, shape, dtype, bytes, and how to read it (CPU tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    read: Callable[[], torch.Tensor]
    order: tuple[str, int] = ("", 0)
    info: TensorInfo | None = None  # where its bytes are in a file (lets GPU-bound reads go through pinned memory)


def checkpoint_source(index: CheckpointIndex) -> dict[str, SourceTensor]:
    """Every tensor of a safetensors checkpoint, read lazily from its byte range."""
    out = {}
    for key, info in index.tensors.items():  # keyed as the index is (renamed indexes keep the file's name inside)
        out[key] = SourceTensor(
            info.name, info.shape, info.dtype, info.nbytes, _reader(info), (info.file, info.start), info
        )
    return out


def _reader(info: TensorInfo) -> Callable[[], torch.Tensor]:
    return lambda: read_tensor(info)


def module_source(model: nn.Module) -> dict[str, SourceTensor]:
    """The model's own (real) weights as the source, one entry per distinct tensor of its state_dict."""
    out: dict[str, SourceTensor] = {}
    seen: set[int] = set()
    meta = []
    for i, (name, t) in enumerate(model.state_dict(keep_vars=True).items()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.device.type == "meta":
            meta.append(name)
            continue
        out[name] = SourceTensor(name, tuple(t.shape), t.dtype, t.numel() * t.element_size(), t.detach, ("", i))
    if meta:
        raise LoadError(
            f"the model has {len(meta)} tensors on the meta device (e.g. {meta[:4]}) and no checkpoint "
            "was given: pass checkpoint='path/to/dir or file.safetensors' to fill them"
        )
    return out
