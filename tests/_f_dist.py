"""Spawn a small torch.distributed job (gloo, CPU) from a test: `run_ranks(fn, world, *args)` starts `world`
processes on a free port, each calling fn(rank, world, *args), and returns each rank's result or error text."""

from __future__ import annotations

import faulthandler
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, out: str, timeout_s: float, args: tuple,
           backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(timeout_s * 3, exit=True)  # a hung rank shows where, then ends
    result: Any
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # noqa: BLE001 (reported to the test)
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    if dist.is_initialized() and result[0] == "ok":
        dist.destroy_process_group()
    os._exit(0)  # no atexit hooks: the test reads the result files


def run_ranks(fn: Callable, world: int, *args: Any, timeout_s: float = 20.0, backend: str = "gloo"
              ) -> list[tuple[str, Any]]:
    """Each rank's ("ok", value) or ("error", text); a rank that wrote nothing gives ("missing", None)."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), out, timeout_s, args, backend), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s * 4
        for p in ctx.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [p.pid for p in ctx.processes if p.is_alive()]
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        assert not alive, f"ranks still running after {timeout_s * 4}s (pids {alive}): the job hung"
        res = []
        for r in range(world):
            f = Path(out, f"rank{r}.pkl")
            res.append(pickle.loads(f.read_bytes()) if f.exists() else ("missing", None))
        return res
