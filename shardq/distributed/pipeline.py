"""The pipeline runtime: rank 0 (the entry rank) runs the model's own forward and `generate()`; each other rank
serves its stage. A forward's batch is cut into micro-batches (GPipe fill-drain): rank 0 runs micro-batch m of its
stage and posts the hidden states to rank 1 without waiting, so stage r works on micro-batch m while stage r+1 works
on m-1; the last rank returns each micro-batch's logits to rank 0.

Every rank runs the model's full forward skeleton around its stage (see `stubs.py`): workers get rank 0's small
inputs (masks, positions, flags) in a command message and feed zero embeddings, replaced by the received hidden
states at their first block. Each micro-batch has its own KV cache on every rank (sessions below). A failure on
any rank travels down the chain as an error message to rank 0, which raises it; the ranks that saw it exit.
"""

from __future__ import annotations

import atexit
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardq.distributed.comm import COMMAND, ERROR, SHUTDOWN, TENSOR, Link, RemoteError
from shardq.distributed.stages import RankPlan
from shardq.distributed.stubs import track_cache
from shardq.hf import cache_kwarg

BATCHED = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")
CACHE_NAMES = ("cache", "past_key_values")
MAX_SESSIONS = 4


class _Upstream(Exception):
    """An error message received from the previous rank (already formatted)."""


def micro_ranges(batch: int, micro_batches: int) -> list[tuple[int, int]]:
    """[start, end) rows of each micro-batch: min(micro_batches, batch) parts, sizes differing by at most one."""
    m = max(1, min(micro_batches, batch))
    base, extra = divmod(batch, m)
    out, start = [], 0
    for i in range(m):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def slice_batch(kwargs: dict[str, Any], a: int, b: int, batch: int) -> dict[str, Any]:
    """The micro-batch [a, b) of the batched inputs; everything else as given."""
    out = {}
    for k, v in kwargs.items():
        batched = k in BATCHED and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch
        out[k] = v[a:b] if batched else v
    return out


def describe(rank: int, exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    return f"rank {rank}: {type(exc).__name__}: {exc}\n{tb}"


class Sessions:
    """KV caches per (session, micro-batch), the latest `MAX_SESSIONS` sessions kept (same order on every rank)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make
        self.caches: OrderedDict[int, dict[int, Any]] = OrderedDict()
        self.ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.next_id = 0

    def id_for(self, user_cache: Any) -> int:
        if user_cache not in self.ids:
            self.ids[user_cache] = self.next_id
            self.next_id += 1
        sid = self.ids[user_cache]
        if sid not in self.caches and _seq_len(user_cache) > 0:
            raise RuntimeError(
                f"this cache belongs to a pipeline session dropped after {MAX_SESSIONS} newer ones: "
                "start the sequence again (a new generate() call)"
            )
        return sid

    def get(self, sid: int, micro: int) -> Any:
        if sid not in self.caches:
            self.caches[sid] = {}
            while len(self.caches) > MAX_SESSIONS:
                self.caches.popitem(last=False)
        self.caches.move_to_end(sid)
        return self.caches[sid].setdefault(micro, self.make())


def _seq_len(cache: Any) -> int:
    try:
        return int(cache.get_seq_length())
    except Exception:  # noqa: BLE001 (a cache type without layers yet)
        return 0


class PipelineRuntime:
    """One rank's side of the pipeline over `model` (already holding only its stage)."""

    def __init__(
        self,
        model: nn.Module,
        rank_plan: RankPlan,
        rank: int,
        micro_batches: int = 1,
        link: Link | None = None,
        owns_group: bool = False,
    ) -> None:
        self.model, self.rp, self.rank = model, rank_plan, rank
        self.world = rank_plan.world_size
        self.last = self.world - 1
        self.micro_batches = micro_batches
        self.link = link or Link()
        self.owns_group = owns_group
        self.broken: str | None = None
        self.inner_forward = model.forward
        self.sessions = Sessions(self._new_cache)
        stage = rank_plan.stages[rank]
        if rank > 0:
            model.get_submodule(stage.blocks[0]).register_forward_pre_hook(self._recv_hidden, with_kwargs=True)
        if rank < self.last:
            model.get_submodule(stage.blocks[-1]).register_forward_hook(self._send_hidden, with_kwargs=True)
        if rank == 0:
            model.forward = self.front
            atexit.register(self.shutdown)
        model.shardq_pipeline = self

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=getattr(self.model, "config", None))

    # ---- hooks around this rank's stage
    def _recv_hidden(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kind, payload = self.link.recv(self.rank - 1)
        if kind == ERROR:
            raise _Upstream(payload)
        if kind != TENSOR:
            raise RemoteError(f"rank {self.rank}: expected hidden states from rank {self.rank - 1}, got kind {kind}")
        like = args[0] if args else kwargs["hidden_states"]
        hidden = payload.to(like.device)
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _send_hidden(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.link.send_tensor(output[0] if isinstance(output, tuple) else output, self.rank + 1)

    # ---- rank 0
    def front(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The model's forward on the entry rank: micro-batches through every stage, logits gathered here."""
        if self.broken:
            raise RemoteError(f"the pipeline stopped after an error:\n{self.broken}")
        if kwargs.get("labels") is not None:
            raise ValueError("labels are not supported by the pipeline forward: compute the loss from the logits")
        x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if x is None:
            raise ValueError("pass input_ids (or inputs_embeds) to the pipelined model")
        batch, tokens = x.shape[0], x.shape[1]
        user_cache = next((kwargs.pop(k) for k in CACHE_NAMES if kwargs.get(k) is not None), None)
        for k in CACHE_NAMES:
            kwargs.pop(k, None)
        use_cache = kwargs.pop("use_cache", None)
        use_cache = bool(
            getattr(getattr(self.model, "config", None), "use_cache", False) if use_cache is None else use_cache
        )
        if use_cache and user_cache is None:
            user_cache = self._new_cache()
        sid = self.sessions.id_for(user_cache) if use_cache else None
        ranges = micro_ranges(batch, self.micro_batches)
        shared = {k: _to_cpu(v) for k, v in kwargs.items() if k != "inputs_embeds"}
        command = {
            "session": sid,
            "ranges": ranges,
            "batch": batch,
            "tokens": tokens,
            "kwargs": shared,
            "use_cache": use_cache,
            "dtype": str(_float_dtype(self.model)).removeprefix("torch."),
        }
        for r in range(1, self.world):
            self.link.send_object(command, r)
        outs = self._run_local(dict(kwargs, input_ids=input_ids), ranges, batch, sid, use_cache)
        logits = self._gather_logits(len(ranges))
        if sid is not None:
            for i in range(len(self.rp.chain)):
                track_cache(user_cache, i, batch, tokens, torch.device("cpu"))
        out = outs[0]
        out["logits"] = torch.cat(logits).to(out["logits"].device)
        if use_cache:
            out[cache_kwarg(self.model)] = user_cache
        return out

    def _run_local(
        self, kwargs: dict[str, Any], ranges: list[tuple[int, int]], batch: int, sid: int | None, use_cache: bool
    ) -> list[Any]:
        outs = []
        try:
            for m, (a, b) in enumerate(ranges):
                kw = slice_batch({k: v for k, v in kwargs.items() if v is not None}, a, b, batch)
                outs.append(self.inner_forward(**kw, use_cache=use_cache, **self._cache_kw(sid, m)))
        except BaseException as exc:
            self.broken = describe(0, exc)
            self.link.send_error(self.broken, 1)
            raise
        return outs

    def _cache_kw(self, sid: int | None, micro: int) -> dict[str, Any]:
        return {} if sid is None else {cache_kwarg(self.model): self.sessions.get(sid, micro)}

    def _gather_logits(self, n: int) -> list[torch.Tensor]:
        logits = []
        for _ in range(n):
            kind, payload = self.link.recv(self.last)
            if kind == ERROR:
                self.broken = payload
                raise RemoteError(f"the pipeline failed:\n{payload}")
            logits.append(payload)
        self.link.flush()
        return logits

    # ---- other ranks
    def serve(self) -> None:
        """Run this rank's stage for each request from rank 0 until rank 0 shuts the pipeline down. A failure here or
        upstream is sent on towards rank 0 and raised (`RemoteError` for one from upstream)."""
        while True:
            kind, cmd = self.link.recv(0, idle=True)
            if kind == SHUTDOWN:
                self.link.flush()
                return
            if kind != COMMAND:
                raise RemoteError(f"rank {self.rank}: expected a request from rank 0, got kind {kind}")
            try:
                self._serve_one(cmd)
            except _Upstream as up:
                self._fail(str(up))
                raise RemoteError(str(up)) from None
            except BaseException as exc:
                self._fail(describe(self.rank, exc))
                raise

    def _fail(self, text: str) -> None:
        self.broken = text
        try:
            self.link.send_error(text, self.rank + 1 if self.rank < self.last else 0)
            self.link.flush()
        except Exception as exc:  # noqa: BLE001 (the next rank may be gone too; the error is raised here anyway)
            self.broken += f"\n(could not pass it on: {exc})"

    def _serve_one(self, cmd: dict[str, Any]) -> None:
        hidden = _hidden_size(self.model)
        dtype = getattr(torch, cmd["dtype"])
        for m, (a, b) in enumerate(cmd["ranges"]):
            kw = slice_batch(cmd["kwargs"], a, b, cmd["batch"])
            kw["inputs_embeds"] = torch.zeros(b - a, cmd["tokens"], hidden, dtype=dtype)
            kw["use_cache"] = cmd["use_cache"]
            out = self.inner_forward(**kw, **self._cache_kw(cmd["session"], m))
            if self.rank == self.last:
                self.link.send_tensor(out["logits"], 0)
        self.link.flush()

    def shutdown(self) -> None:
        """Rank 0: tell every worker to stop (once); then leave the process group if the pipeline made it."""
        if self.rank != 0 or getattr(self, "_down", False):
            return
        self._down = True
        atexit.unregister(self.shutdown)
        if self.broken is None:
            for r in range(1, self.world):
                self.link.send_shutdown(r)
            self.link.flush()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _to_cpu(v: Any) -> Any:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else v


def _float_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for n in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, n, None), int):
            return getattr(cfg, n)
    raise ValueError(f"{type(model).__name__}'s config names no hidden size: the pipeline needs one")
