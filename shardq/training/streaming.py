"""Backward through streamed blocks: checkpoint each offloaded block around the dispatcher's streaming forward.

A streamed ("stream"/"disk") block's weights are in a device slot only while its forward runs; the next blocks
reuse the slot, so tensors its forward saved for the backward would be overwritten (autograd then refuses:
"modified by an inplace operation"). transformers' activation checkpointing does not help by itself: it
checkpoints the layer's class `forward`, inside the dispatcher's instance-level wrapper, so its recomputation runs
without streaming (on the weights at rest: host memory or meta). Here the checkpoint goes *around* the wrapper:
the recomputation streams the block in again, right before the block's backward, and the slot is reused only by
a later block's recomputation. On a GPU the copy stream is first ordered after the compute queued so far (the
previous block's backward still reads its slot), which the streamer's per-forward events do not cover.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

OFFLOADED = ("stream", "disk")


def offloaded_blocks(model: nn.Module) -> list[str]:
    """Names of the model's streamed and disk blocks (none if it is not dispatched)."""
    rt = getattr(model, "shardq_runtime", None)
    return [] if rt is None else [n for n, b in rt.blocks.items() if b.mode in OFFLOADED]


def _after_compute(streamer: Any) -> None:
    """Order the streamer's copy stream after everything queued on the compute stream (GPU only)."""
    stream = getattr(streamer, "_stream", None)
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(streamer.device))


def _checkpointed(module: Any, streamed: Callable, streamer: Any) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        _after_compute(streamer)
        return streamed(*args, **kwargs)

    @functools.wraps(streamed)
    def forward(*args: Any, **kwargs: Any) -> Any:
        # transformers' own per-layer checkpoint would run inside the streaming and recompute without the weights;
        # re-enabling checkpointing on the model (the HF Trainer does) sets it again, so it is cleared per call
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
        if not (module.training and torch.is_grad_enabled()):
            return streamed(*args, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


def checkpoint_offloaded_blocks(model: Any) -> list[str]:
    """Wrap every streamed/disk block of a dispatched model in a non-reentrant checkpoint around its streaming
    forward (in training mode with grad enabled; otherwise the forward is unchanged). Idempotent; returns the
    block names. `remove_dispatch` removes the wrappers with the streaming."""
    names = offloaded_blocks(model)
    streamer = model.shardq_runtime.streamer if names else None
    for name in names:
        module: Any = model.get_submodule(name) if name else model
        if getattr(module, "shardq_checkpointed", False):
            continue
        if "forward" not in module.__dict__:
            raise RuntimeError(f"block {name!r} has no streaming forward installed: dispatch the model first")
        module.forward = _checkpointed(module, module.__dict__["forward"], streamer)
        module.shardq_checkpointed = True
    return names
