"""CUDA kernels for the shardq ops (owned by the kernels work; see DESIGN.md)."""


def register() -> None:
    """Register CUDA implementations of the shardq ops; the reference stays the default kernel."""
