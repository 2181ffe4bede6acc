"""`StageStub`: stands, on one rank, for a unit another rank holds. It holds no tensors and passes its first input
through, so the model's own forward runs unchanged around a rank's stage (masks, rotary tables and cache
bookkeeping computed as in one process); the real hidden states enter at the stage's first block (a hook).

A stub of a chain block keeps the rank's KV cache length right: transformers reads the sequence length from a
cache layer (layer 0 for masks and positions), so the stub appends a one-element-wide placeholder per token to its
layer, the cost of B x S floats per block instead of the real keys and values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class StageStub(nn.Module):
    """Placeholder for unit `name`; `layer_idx` is its index in the block chain (None for other units)."""

    def __init__(self, name: str, layer_idx: int | None = None) -> None:
        super().__init__()
        self.stub_of = name
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        if self.layer_idx is not None and isinstance(hidden, torch.Tensor) and hidden.dim() >= 2:
            track_cache(_cache_of(kwargs), self.layer_idx, hidden.shape[0], hidden.shape[1], hidden.device)
        return hidden

    def extra_repr(self) -> str:
        return f"stub_of={self.stub_of!r}"


def _cache_of(kwargs: dict[str, Any]) -> Any:
    for k in CACHE_KWARGS:
        c = kwargs.get(k)
        if c is not None and hasattr(c, "update"):
            return c
    return None


def track_cache(cache: Any, layer_idx: int, batch: int, tokens: int, device: torch.device) -> None:
    """Advance `cache`'s layer `layer_idx` by `tokens` positions with a placeholder (length bookkeeping only)."""
    if cache is None:
        return
    ph = torch.zeros(batch, 1, tokens, 1, device=device)
    cache.update(ph, ph, layer_idx)


def chain_index(chain: list[str], name: str) -> int | None:
    return chain.index(name) if name in chain else None
