"""A byte-counting progress bar for long loads (tqdm), silent when disabled or for small loads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

# Below this many bytes a load takes well under a second: no bar, so tests and small scripts stay quiet.
MIN_BAR_BYTES = 256 * 2**20


class _Bar(Protocol):
    def update(self, n: int) -> None: ...


class _NoBar:
    def update(self, n: int) -> None:
        """Ignore progress."""


@contextmanager
def byte_bar(total: int, enabled: bool | str = True, desc: str = "Loading") -> Iterator[_Bar]:
    """A tqdm bar over `total` bytes; `enabled=True` shows it for loads of MIN_BAR_BYTES or more, "always"
    shows it for any size, False never."""
    show = enabled == "always" or (enabled is True and total >= MIN_BAR_BYTES)
    if not show:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
