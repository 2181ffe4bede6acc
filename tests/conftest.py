"""Shared fixtures."""

import pytest

from shardq.checkpoint import index as checkpoint


@pytest.fixture
def checkpoint_reads(monkeypatch) -> list[int]:
    """Byte counts of every read that shardq.checkpoint.index makes through `open` (to prove only headers are read)."""
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

    monkeypatch.setattr(checkpoint, "open", lambda p, m="r": Counting(real_open(p, m)), raising=False)
    return reads
