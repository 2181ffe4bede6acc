"""The multi-rank plan: a model's blocks cut into contiguous stages, one per rank, each stage then placed on its
rank's GPUs / CPU / disk by the single-process planner (`plan_model`) exactly as one process would place it.

The cut is over the chain of no-split blocks (decoder layers). Rank 0 also holds what comes before the chain
(embeddings), the last rank what comes after it (final norm, head); modules without checkpoint tensors (rotary
tables, whose buffers are recomputed on load) are kept on every rank, and a tied group (embedding = head) is held
whole by each rank that needs a member. Everything else is replaced on a rank by a `StageStub` holding no tensors.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from shardq import hf
from shardq.distributed.stubs import StageStub, chain_index
from shardq.memory import DeviceKey, format_size
from shardq.planning.placement import Plan, PlanError
from shardq.planning.planner import plan_model
from shardq.planning.units import decompose, is_whole


@dataclass
class Stage:
    """What one rank holds: `blocks` (chain blocks, in order) and `extra` (units before/after the chain or tied)."""

    rank: int
    blocks: list[str]
    extra: list[str] = field(default_factory=list)
    plan: Plan | None = None

    @property
    def owned(self) -> list[str]:
        return self.extra + self.blocks


@dataclass
class RankPlan:
    """Stages per rank, the bytes each link carries per token, and each rank's single-process `Plan`."""

    stages: list[Stage]
    chain: list[str]
    replicated: list[str]
    link_bytes_per_token: int  # hidden states crossing each stage boundary (rank r -> r+1)
    logits_bytes_per_token: int  # logits of one position, last rank -> rank 0
    unit_bytes: dict[str, int]

    @property
    def world_size(self) -> int:
        return len(self.stages)

    def owner(self, block: str) -> int:
        return next(s.rank for s in self.stages if block in s.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {"rank": s.rank, "blocks": s.blocks, "extra": s.extra, "plan": s.plan.to_dict() if s.plan else None}
                for s in self.stages
            ],
            "replicated": self.replicated,
            "link_bytes_per_token": self.link_bytes_per_token,
            "logits_bytes_per_token": self.logits_bytes_per_token,
        }


def chain_units(model: nn.Module) -> tuple[list[str], list[str]]:
    """(all units in model order, the chain of no-split blocks among them)."""
    guard = set(hf.no_split_modules(model))
    units = decompose(model, guard)
    chain = [u for u in units if u and is_whole(model.get_submodule(u), u, guard)]
    return units, chain


def persistent_names(model: nn.Module) -> set[str]:
    """Names of the tensors a checkpoint holds (non-persistent buffers excluded)."""
    return set(model.state_dict(keep_vars=True))


def _replicated(model: nn.Module, units: list[str]) -> list[str]:
    """Units with no checkpoint tensors (rotary tables): recomputed on load, kept on every rank."""
    saved = persistent_names(model)
    return [u for u in units if not any(n == u or n.startswith(u + ".") for n in saved)]


def unit_bytes(model: nn.Module, quant: Any, units: list[str]) -> dict[str, int]:
    """Bytes of each unit as placed on a GPU under `quant`, from the planner on one hypothetical huge GPU."""
    plan = plan_model(model, quant=quant, max_memory={0: 1 << 60}, gpus=[1 << 60], device_map="sequential")
    got = {p.name: p.nbytes for p in plan.placements}
    return {u: got.get(u, 0) for u in units}


def cut(sizes: Sequence[int], shares: Sequence[float], head: int = 0, tail: int = 0) -> list[int]:
    """Block counts per rank: contiguous runs of `sizes` whose bytes follow `shares` (rank 0 also carries `head`
    bytes, the last rank `tail`); every rank gets at least one block."""
    n, ranks = len(sizes), len(shares)
    if n < ranks:
        raise PlanError(f"the model has {n} blocks but {ranks} ranks: use at most {n} ranks")
    total = head + sum(sizes) + tail
    weight = sum(shares)
    counts, start, acc = [], 0, head
    for r in range(ranks - 1):
        target = total * sum(shares[: r + 1]) / weight
        end = start + 1
        while end < n - (ranks - r - 1) and abs(acc + sum(sizes[start : end + 1]) - target) <= abs(
            acc + sum(sizes[start:end]) - target
        ):
            end += 1
        acc += sum(sizes[start:end])
        counts.append(end - start)
        start = end
    counts.append(n - start)
    return counts


def capacity(budgets: Mapping[DeviceKey, int]) -> int:
    """How much of a stage a rank should take: its GPU budgets, else its CPU budget (disk is a spill, not a share)."""
    gpu = sum(v for k, v in budgets.items() if isinstance(k, int))
    return gpu or budgets.get("cpu", 0) or budgets.get("disk", 0)


def _tied_with(model: nn.Module, units: list[str], owned: list[str]) -> list[str]:
    """Units sharing a tensor with an owned unit (a tied head needs its embedding's weight)."""
    ids: dict[int, set[str]] = {}
    for u in units:
        mod = model.get_submodule(u) if u else model
        for t in list(mod.parameters()) + list(mod.buffers()):
            ids.setdefault(id(t), set()).add(u)
    out = set(owned)
    for group in ids.values():
        if group & set(owned):
            out |= group
    return [u for u in units if u in out and u not in owned]


def split_model(
    model: nn.Module, budgets: Sequence[Mapping[DeviceKey, int]], quant: Any = None, stages: Sequence[int] | None = None
) -> RankPlan:
    """Stages for `len(budgets)` ranks (no per-rank placement yet: `plan_ranks` adds it). `stages` gives the block
    counts per rank explicitly; by default they follow each rank's `capacity`."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise PlanError(
            f"{type(model).__name__} is an encoder-decoder model: pipeline stages support decoder-only "
            "models (one chain of layers); load it in one process with load_sharded(..., distributed=None)"
        )
    units, chain = chain_units(model)
    if not chain:
        raise PlanError("no repeated blocks (decoder layers) found to cut into stages: pass no_split block names")
    ranks = len(budgets)
    if ranks < 2:
        raise PlanError(f"a pipeline needs at least 2 ranks, got {ranks}: launch with torchrun --nproc-per-node 2")
    replicated = _replicated(model, units)
    sizes = unit_bytes(model, quant, units)
    first, last = units.index(chain[0]), units.index(chain[-1])
    head = [u for u in units[:first] if u not in replicated]
    tail = [u for u in units[last + 1 :] if u not in replicated]
    if stages is None:
        shares = [float(capacity(b)) for b in budgets]
        if not all(shares):
            raise PlanError(
                f"rank(s) {[r for r, s in enumerate(shares) if not s]} have no memory budget: give each "
                "rank a max_memory with a GPU, 'cpu' or 'disk' entry"
            )
        counts = cut([sizes[b] for b in chain], shares, _work(model, head, sizes), _work(model, tail, sizes))
    else:
        counts = _check_counts(stages, len(chain), ranks)
    out, start = [], 0
    for r, c in enumerate(counts):
        extra = (head if r == 0 else []) + (tail if r == ranks - 1 else [])
        blocks = chain[start : start + c]
        start += c
        if r == ranks - 1:  # a tied head needs its embedding's weight; rank 0's embedding needs no head
            extra += _tied_with(model, [u for u in units if u not in replicated], tail)
        out.append(Stage(r, blocks, [u for u in units if u in extra]))
    return RankPlan(out, chain, replicated, _hidden_bytes(model), _vocab_bytes(model), sizes)


def _work(model: nn.Module, units: list[str], sizes: Mapping[str, int]) -> int:
    """Bytes a forward reads of `units`: an embedding looks up a few rows, so it weighs nothing in the cut (its
    bytes still count against its rank's budget)."""
    return sum(sizes[u] for u in units if not isinstance(model.get_submodule(u), nn.Embedding))


def _check_counts(stages: Sequence[int], n: int, ranks: int) -> list[int]:
    counts = list(stages)
    if len(counts) != ranks or any(not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != n:
        raise PlanError(
            f"stages={counts} must give one block count >= 1 per rank ({ranks} ranks) summing to the "
            f"model's {n} blocks, e.g. {cut([1] * n, [1.0] * ranks)}"
        )
    return counts


def _config_int(model: nn.Module, names: Sequence[str]) -> int:
    cfg = getattr(model, "config", None)
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int):
            return v
    return 0


def _itemsize(model: nn.Module) -> int:
    p = next(iter(model.parameters()), None)
    return p.element_size() if p is not None and p.is_floating_point() else 4


def _hidden_bytes(model: nn.Module) -> int:
    return _config_int(model, ("hidden_size", "n_embd", "d_model")) * _itemsize(model)


def _vocab_bytes(model: nn.Module) -> int:
    return _config_int(model, ("vocab_size",)) * _itemsize(model)


def dropped_units(rank_plan: RankPlan, rank: int) -> list[str]:
    """Units `rank` does not hold (stubbed there)."""
    keep = set(rank_plan.stages[rank].owned) | set(rank_plan.replicated)
    return [u for u in rank_plan.unit_bytes if u not in keep]


def stage_model(model: nn.Module, rank_plan: RankPlan, rank: int, aliases: Sequence[str] = ()) -> nn.Module:
    """Replace, in place, every unit that `rank` does not hold by a `StageStub`, and let the loader skip their
    checkpoint tensors (`_keys_to_ignore_on_load_unexpected` on the instance), also under the checkpoint's own
    names `aliases` (before transformers' renames, e.g. GPT-NeoX's `embed_out` for `lm_head`)."""
    dropped = []
    for u in dropped_units(rank_plan, rank):
        if not u:
            raise PlanError("the model's root holds tensors of its own: it cannot be cut into stages")
        parent, _, attr = u.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, StageStub(u, chain_index(rank_plan.chain, u)))
        dropped.append(u)
    ignore = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    ignore += [rf"^{re.escape(u)}\." for u in dropped] + [rf"^{re.escape(a)}$" for a in aliases]
    model._keys_to_ignore_on_load_unexpected = ignore
    return model


def plan_ranks(
    model: nn.Module,
    budgets: Sequence[Mapping[DeviceKey, int]],
    quant: Any = None,
    stages: Sequence[int] | None = None,
    **plan_kwargs: Any,
) -> RankPlan:
    """Stages per rank (`split_model`) and each rank's placement by `plan_model` under its own budgets (GPUs as
    hypothetical GPUs of those sizes, so any rank's machine can plan every rank). `device_map` may be a list with
    one strategy or explicit map (of that rank's units) per rank. A stage that does not fit raises `PlanError`
    naming the rank."""
    rp = split_model(model, budgets, quant, stages)
    maps = per_rank(plan_kwargs.pop("device_map", "auto"), len(budgets), "device_map")
    for st, b in zip(rp.stages, budgets):
        part = stage_model(copy.deepcopy(model), rp, st.rank)
        gpus = [v for k, v in b.items() if isinstance(k, int)]
        local: dict[DeviceKey, int] = {
            **dict(enumerate(gpus)),
            **{k: v for k, v in b.items() if not isinstance(k, int)},
        }
        try:  # a rank's GPUs planned as hypothetical GPUs 0..n-1 of their sizes (rank 1's GPU 1 is its first)
            st.plan = plan_model(
                part, quant=quant, max_memory=local, gpus=gpus or None, device_map=maps[st.rank], **plan_kwargs
            )
        except PlanError as exc:
            err = PlanError(f"rank {st.rank} (blocks {_span(st.blocks)}): {exc}")
            err.missing = exc.missing
            raise err from None
    return rp


def per_rank(value: Any, world: int, what: str) -> list[Any]:
    """One value per rank: a list or tuple gives each rank its own (its length must be the world size)."""
    if isinstance(value, (list, tuple)):
        if len(value) != world:
            raise PlanError(
                f"{what} lists {len(value)} entries but the job has {world} ranks: give one per rank, "
                "or one value that every rank applies to its own stage"
            )
        return list(value)
    return [value] * world


def _span(blocks: list[str]) -> str:
    return f"{blocks[0]} .. {blocks[-1]}" if len(blocks) > 1 else blocks[0]


def format_rank_plan(rp: RankPlan) -> str:
    """A table of stages per rank: blocks, bytes placed per device, and what each link carries per token."""
    lines = [f"{rp.world_size} ranks, {len(rp.chain)} blocks in stages"]
    for st in rp.stages:
        placed = st.plan.totals if st.plan else {}
        where = ", ".join(f"{k}: {format_size(v)}" for k, v in placed.items() if v)
        extra = f" + {', '.join(st.extra)}" if st.extra else ""
        lines.append(f"  rank {st.rank}: {len(st.blocks)} blocks ({_span(st.blocks)}){extra}  [{where}]")
    for r in range(rp.world_size - 1):
        lines.append(f"  link rank {r} -> {r + 1}: {format_size(rp.link_bytes_per_token)} per token (hidden states)")
    lines.append(
        f"  link rank {rp.world_size - 1} -> 0: {format_size(rp.logits_bytes_per_token)} per sequence "
        "per step (the last position's logits; a forward returning all positions sends that per token)"
    )
    return "\n".join(lines)
