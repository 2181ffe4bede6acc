"""`Pipeline`: the `distributed=` option of `load_sharded`. Under `torchrun` every rank makes the same call; each
reads its own budgets, the budgets are gathered, every rank computes the same multi-rank plan, replaces the blocks
it does not hold by stubs and loads only its stage's tensors from the shared checkpoint (quantize-on-load and caps
per rank, as one process does). Rank 0 gets the model back; the others serve their stage until rank 0 is done.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardq.distributed.comm import Link, RemoteError
from shardq.distributed.pipeline import PipelineRuntime
from shardq.distributed.stages import (
    dropped_units,
    per_rank,
    plan_ranks,
    stage_model,
)
from shardq.memory import get_max_memory


@dataclass
class Pipeline:
    """Pipeline stages over torch.distributed.

    `micro_batches`: parts each forward's batch is cut into (GPipe); `stages`: blocks per rank (default: by each
    rank's memory); `backend`: "gloo" or "nccl" (default: nccl when every rank has a GPU, else gloo), used only when
    the process group is not yet initialised; `timeout_s`: the process group's timeout (a rank that stops
    answering mid-forward is reported after it); `exit_workers`: ranks other than 0 serve, then leave the process
    (`sys.exit`) so the user's code after `load_sharded` runs on rank 0 only; False returns the model on every rank
    (call `model.shardq_pipeline.serve()` there)."""

    micro_batches: int = 1
    stages: Sequence[int] | None = None
    backend: str | None = None
    timeout_s: float = 300.0
    exit_workers: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"micro_batches={self.micro_batches!r}: give an int >= 1 (e.g. 4 per stage)")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend={self.backend!r}: use 'gloo', 'nccl' or None (chosen from the machines)")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r}: give a positive number of seconds")

    def load(
        self,
        model: nn.Module,
        checkpoint: Any = None,
        *,
        max_memory: Any = None,
        quant: Any = None,
        offload_dir: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        """Load this rank's stage of `model` (see the module docstring); `max_memory` is this rank's caps, or a list
        of caps per rank; `device_map` a strategy, or a list of one strategy or explicit map (of that rank's blocks)
        per rank. Other keyword arguments are `load_sharded`'s."""
        from shardq.loading.loader import load_sharded

        owns = init_group(self.backend, self.timeout_s)
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = rank_caps(max_memory, rank, world)
        budgets = gather_budgets(mine, offload_dir)
        plan_kw = {
            k: kwargs[k] for k in ("device_map", "workload", "offload_mode", "kv_cache", "training") if k in kwargs
        }
        rp = plan_ranks(model, budgets, quant, self.stages, offload_dir=offload_dir, **plan_kw)
        stage_model(model, rp, rank, checkpoint_aliases(model, checkpoint, dropped_units(rp, rank)))
        error = None
        kwargs["device_map"] = per_rank(kwargs.get("device_map", "auto"), world, "device_map")[rank]
        try:
            load_sharded(model, checkpoint, max_memory=budgets[rank], quant=quant, offload_dir=offload_dir, **kwargs)
        except Exception as exc:  # noqa: BLE001 (every rank must learn of it before any waits for another)
            error = exc
        _agree_loaded(error, rank, world)
        link = Link(_link_device(budgets, dist.get_backend()))
        runtime = PipelineRuntime(model, rp, rank, self.micro_batches, link, owns_group=owns)
        model.shardq_rank_plan = rp
        if rank > 0 and self.exit_workers:
            serve_and_exit(runtime)
        return model


def init_group(backend: str | None, timeout_s: float) -> bool:
    """Initialise the default process group from torchrun's environment unless it exists. True if made here."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "distributed= needs a process group: launch with torchrun (torchrun --nproc-per-node 2 "
            "script.py), or call torch.distributed.init_process_group first"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def rank_caps(max_memory: Any, rank: int, world: int) -> Mapping[Any, Any] | None:
    """This rank's max_memory: the dict itself, or its entry of a list with one dict per rank."""
    if isinstance(max_memory, (list, tuple)):
        if len(max_memory) != world:
            raise ValueError(
                f"max_memory lists {len(max_memory)} caps but the job has {world} ranks: give one dict "
                "per rank, or one dict that each rank applies to its own machine"
            )
        return max_memory[rank]
    return max_memory


def gather_budgets(max_memory: Mapping[Any, Any] | None, offload_dir: Any = None) -> list[dict[Any, int]]:
    """Every rank's budgets (its own `get_max_memory`: NVML / psutil, or its caps), in rank order."""
    mine = get_max_memory(max_memory, offload_dir=offload_dir)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def checkpoint_aliases(model: nn.Module, checkpoint: Any, dropped: Sequence[str]) -> list[str]:
    """The checkpoint's own names (headers only) of the tensors of `dropped` units, where transformers renames them."""
    if checkpoint is None or not dropped:
        return []
    from shardq.checkpoint.conversions import convert_source
    from shardq.checkpoint.index import index_checkpoint
    from shardq.checkpoint.source import checkpoint_source

    source = convert_source(model, checkpoint_source(index_checkpoint(checkpoint)))
    inside = lambda k: any(k.startswith(u + ".") for u in dropped)
    return sorted({src.name for k, src in source.items() if inside(k) and src.name != k})


def _agree_loaded(error: Exception | None, rank: int, world: int) -> None:
    """Every rank reports how its load went; any failure is raised on every rank, naming the rank."""
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg]
    if failed:
        r, msg = failed[0]
        raise RemoteError(f"rank {r} failed to load its stage: {msg}")


def _link_device(budgets: list[dict[Any, int]], backend: str) -> torch.device:
    """NCCL carries GPU tensors (every rank has a GPU then); gloo CPU ones."""
    if "nccl" in backend and all(any(isinstance(k, int) for k in b) for b in budgets):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def serve_and_exit(runtime: PipelineRuntime) -> None:
    """A worker's whole life after loading: serve, leave the group, exit (1 with the error printed on failure)."""
    code = 0
    try:
        runtime.serve()
    except BaseException as exc:  # noqa: BLE001 (reported on rank 0 too; the process ends either way)
        print(f"shardq pipeline rank {runtime.rank}: {exc}", file=sys.stderr)
        code = 1
    if dist.is_initialized() and code == 0:
        dist.destroy_process_group()
    sys.exit(code)
