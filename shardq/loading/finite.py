"""NaN/Inf in a checkpoint's float weights, found as each tensor streams in (no second read of the file).

Each floating tensor's min and max are reduced where it already is (one pass, a scalar result, no copy): either
is NaN or infinite exactly when the tensor holds a NaN or an infinity. On a GPU the flags stay on the device until
the end of the load, so the check adds no synchronisation per tensor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from shardq.checkpoint.source import LoadError

NONFINITE = ("warn", "error", "ignore")


def check_mode(mode: object) -> str:
    """`load_sharded(nonfinite=...)`: refused before anything is read when it is not one of NONFINITE."""
    if mode not in NONFINITE:
        raise LoadError(f"nonfinite={mode!r} is not one of {NONFINITE}: 'warn' (default), 'error' or 'ignore'")
    return str(mode)


@dataclass
class FiniteCheck:
    """Collects one flag per floating tensor, resolves them once at the end of the load."""

    mode: str = "warn"
    flags: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    def see(self, name: str, t: torch.Tensor) -> None:
        if self.mode == "ignore" or not t.is_floating_point() or t.numel() == 0:
            return
        lo, hi = torch.aminmax(t)
        self.flags.append((name, ~(torch.isfinite(lo) & torch.isfinite(hi))))

    def bad(self) -> list[str]:
        """Names of the tensors that hold a NaN or an infinity (one synchronisation for all of them)."""
        if not self.flags:
            return []
        found = torch.stack([f.to("cpu", non_blocking=False) for _, f in self.flags]).tolist()
        return [name for (name, _), b in zip(self.flags, found) if b]

    def resolve(self, quantized: bool) -> None:
        """Raise (mode 'error') or warn (mode 'warn') naming every tensor with a NaN or an infinity."""
        names = self.bad()
        if not names:
            return
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        why = " (4-bit: one such value makes its whole block NaN)" if quantized else ""
        msg = f"{len(names)} checkpoint tensor(s) hold NaN or Inf values: {shown}{why}"
        if self.mode == "error":
            raise LoadError(msg + "; the load was rolled back (pass nonfinite='warn' to load anyway)")
        warnings.warn(msg + " (pass nonfinite='error' to refuse such checkpoints)", RuntimeWarning, stacklevel=4)
