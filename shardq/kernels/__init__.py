"""CUDA kernels for the shardq ops (csrc/, built with nvcc on first use and cached; see build.py).

`register()` (called at the end of shardq.ops) registers the CUDA implementations of the `shardq::*` ops
beside their pure-PyTorch reference. It is cheap: nothing is built or loaded and no GPU is touched until an op
first runs on a CUDA tensor. If the library cannot be built or loaded, shardq warns once with the reason and
the ops keep using the reference. `python -m shardq.kernels --check` builds, loads and checks every op.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register CUDA implementations of the shardq ops; the reference stays the default kernel."""
    global _registered
    if _registered:
        return
    import torch

    from shardq.kernels.cuda_ops import KERNELS

    for name, fn in KERNELS.items():
        torch.library.register_kernel(f"shardq::{name}", "cuda", fn)
    _registered = True


def cuda_kernel(name: str):
    """The CUDA implementation registered for op `shardq::<name>` (shardq.ops.call uses it to skip the dispatcher)."""
    from shardq.kernels.cuda_ops import KERNELS

    return KERNELS[name]


def available() -> bool:
    """True if the kernels library is built and loaded (builds it on first call)."""
    from shardq.kernels import lib

    return lib.load() is not None
