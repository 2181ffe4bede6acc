"""Numeric comparisons shared by the tests."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of `a` against the reference `b` (Frobenius norms, in fp64)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
