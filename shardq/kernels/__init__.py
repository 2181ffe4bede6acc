"""CUDA kernels for the shardq ops (csrc/, built with nvcc on first use and cached; see build.py).

`ops` defines the `shardq::*` custom ops (pure-PyTorch reference as the default kernel) and registers the CUDA
implementations of `cuda_ops` beside it. Registering is cheap: nothing is built or loaded and no GPU is
touched until an op first runs on a CUDA tensor. If the library cannot be built or loaded, shardq warns once with
the reason and the ops keep using the reference. `python -m shardq.kernels --check` builds, loads and checks every op.
"""

from __future__ import annotations


def available() -> bool:
    """True if the kernels library is built and loaded (builds it on first call)."""
    from shardq.kernels import lib

    return lib.load() is not None
