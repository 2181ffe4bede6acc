"""How a block placed on "cpu" runs, and why: the rule shared by the planner and the dispatcher.

A "cpu" block either computes on the CPU in fp32 ("cpu", bitsandbytes' fp32 CPU offload) or has its weights
copied to the execution GPU for each forward ("stream"). Per block, first match wins:

1. the user forced a mode: `offload_mode="cpu"|"stream"` for every block, or a dict per block or parent module
   name (`load_sharded`, the planner; `offload_modes` in `dispatch_model`); the longest covering name wins, see
   `forcing_key`;
2. no GPU: "cpu";
3. the quantization asks for fp32 CPU offload (`fp32_cpu_offload`, bitsandbytes'
   `llm_int8_enable_fp32_cpu_offload`): "cpu", as the user asked for fp32 CPU compute (an offloaded `lm_head`
   included);
4. the block holds other device-map entries (a parent's own tensors): "cpu" (it cannot stream);
5. the block computes (linear layers, norms, anything that is not a lookup): "stream" — a GPU matmul beats the
   CPU, and a norm's activations weigh more than its weights, so copying the weights moves fewer bytes;
6. a lookup block (embedding tables, no linear layer) tied to a computing block (an embedding shared with the
   head): "stream" — the head streams the table anyway, and a CPU copy would add an fp32 table in host memory;
7. any other lookup block: "cpu" when its table is larger than the rows it sends to the GPU for the workload
   (batch x seq_len x width), which is the usual case (vocab >> tokens): gathering a few rows on the CPU beats
   copying the whole table over PCIe, and the table no longer sizes the two streaming slots on the GPU; else
   "stream".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from shardq.memory import format_size
from shardq.quant.sizing import linear_shape

DEFAULT_WORKLOAD = (1, 512)
LOOKUP_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


class RunMode(str):
    """A run mode ("gpu", "cpu", "stream", "disk") that also says why it was chosen (`.reason`).

    It is a `str`: it compares, hashes, prints and serialises as the plain mode, so code reading modes as
    strings keeps working."""

    reason: str

    def __new__(cls, mode: str, reason: str = "") -> RunMode:
        obj = super().__new__(cls, mode)
        obj.reason = reason
        return obj


@dataclass(frozen=True)
class BlockKind:
    """What the rule needs to know about one block placed on "cpu"."""

    width: int  # output width if the block only looks rows up (largest embedding_dim), else 0
    nbytes: int  # bytes a stream would copy per forward (the block as stored)
    tied_to: str | None = None  # a computing block that shares one of its tensors
    nested: bool = False  # holds other device-map entries (a parent's own tensors)


def _computes(module: nn.Module) -> bool:
    return (
        linear_shape(module) is not None
        or isinstance(module, nn.modules.conv._ConvNd)
        or (hasattr(module, "in_features") and hasattr(module, "out_features"))
    )


def lookup_width(module: nn.Module, own_only: bool = False) -> int:
    """The output width (largest `embedding_dim`) if `module` only looks rows up: it holds embedding tables, no
    linear-like layer, and its tables are most of its elements (a norm beside them is fine); else 0."""
    table = other = width = 0
    for m in [module] if own_only else module.modules():
        if _computes(m):
            return 0
        n = sum(t.numel() for t in [*m._parameters.values(), *m._buffers.values()] if t is not None)
        if isinstance(m, LOOKUP_TYPES):
            table += n
            width = max(width, m.embedding_dim)
        else:
            other += n
    return width if table and table >= other else 0


def choose_cpu_run(
    kind: BlockKind,
    *,
    has_gpu: bool,
    fp32_cpu_offload: bool = False,
    workload: tuple[int, int] = DEFAULT_WORKLOAD,
    itemsize: int = 2,
) -> RunMode:
    """The run mode ("cpu" or "stream") of a block placed on "cpu" when the user forced none (rules 2-7)."""
    if not has_gpu:
        return RunMode("cpu", "no GPU")
    if fp32_cpu_offload:
        return RunMode("cpu", "fp32_cpu_offload")
    if kind.nested:
        return RunMode("cpu", "holds nested entries")
    if not kind.width:
        return RunMode("stream", "computes: on the GPU")
    if kind.tied_to is not None:
        return RunMode("stream", f"lookup tied to {kind.tied_to}")
    rows = workload[0] * workload[1] * kind.width * itemsize
    if kind.nbytes > rows:
        return RunMode("cpu", f"lookup: rows {format_size(rows)} < table {format_size(kind.nbytes)}")
    return RunMode("stream", f"lookup: rows {format_size(rows)} >= table {format_size(kind.nbytes)}")


def forced(mode: str, how: str) -> RunMode:
    """A mode the user asked for; `how` names the argument (e.g. "offload_mode")."""
    return RunMode(mode, f"forced by {how}")


def covers(key: str, name: str) -> bool:
    """True if module name `key` is block `name` or one of its parents ("" is the whole model)."""
    return key == "" or name == key or name.startswith(key + ".")


def forcing_key(name: str, keys: Iterable[str]) -> str | None:
    """The key of a per-block `offload_mode` dict that decides block `name`: the longest one covering it."""
    best = None
    for key in keys:
        if covers(key, name) and (best is None or len(key) > len(best)):
            best = key
    return best
