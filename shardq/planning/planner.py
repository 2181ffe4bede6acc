"""The planner: where every block of a model goes, its bytes as placed, and how offloaded blocks run.

`plan_model` works on a module tree (the meta device is enough): it cuts the tree into units (no-split blocks
such as decoder layers, else leaf modules), groups units that share tied parameters, then places them with a
strategy ("sequential": fill GPUs in order, then the CPU, then disk; "auto"/"balanced": spread over the GPUs when
the model fits on them, as transformers' device_map="auto" does, else the same fill)
or checks an explicit accelerate-format `device_map`. Every device's placed bytes plus its working reserve stay
within its `max_memory` budget; `plan` does the same for a checkpoint directory, reading headers only.
A module that holds tensors itself besides its children (Bart's root `final_logits_bias`) becomes an entry of
just those tensors with its children listed inside it: the longest name prefix owns a tensor, as the loader and
the dispatcher read maps; such an entry is never offloaded.

Reserves (the runtime's working memory, counted against the budget):
  GPU  load        largest tensor quantized there on load: its source-dtype copy + an fp32 working copy
                   (unquantized tensors are copied straight into place)
       activations one block's forward for the workload (batch x seq_len), + fp32 logits where the head runs
       stream      on the execution GPU: two slots of the largest streamed block (prefetch double buffering);
                   streamed are all CPU blocks in "stream" mode, and disk blocks always
       workspace   scratch of the CUDA quantized matmuls for the workload's tokens
  CPU  (when it holds blocks) the largest tensor of the model (every tensor is read through host memory),
       fp32 activations when blocks compute there, two staging buffers of the largest disk block, and
       without a GPU the two stream slots of disk blocks computed on the CPU.
Generation (`kv_cache`, on by default for causal LMs) and training (`training`) add the reserves of
`shardq.planning.reserves`: each block's KV cache, LoRA states and checkpoints on the device that executes it
(streamed blocks: the execution GPU), decode graph pools, recomputed activations and the logits' gradient.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardq import hf
from shardq.config import QuantConfig
from shardq.hf import check_checkpoint
from shardq.memory import (
    DeviceKey,
    clip_budgets,
    device_capacities,
    device_label,
    format_size,
    get_max_memory,
)
from shardq.planning.budgets import disk_overhead, host_for_disk, refuse_reserve_only
from shardq.planning.devicemap import explicit_units
from shardq.planning.inputs import (
    STRATEGIES,
    check_forced,
    check_offload_mode,
    check_workload,
    checkpoint_dtype,
    compute_itemsize,
    expert_workspace,
    head_unit,
    quantized_shapes,
    resolve_dtype,
    whole_model_map,
)
from shardq.planning.notes import expert_warnings, tie_warnings, unquantized_warnings
from shardq.planning.placement import Placement, Plan, PlanError, Training
from shardq.planning.reserves import Extras, add_bytes, build_extras, check_kv_cache, check_training
from shardq.planning.runmode import (
    DEFAULT_WORKLOAD,
    BlockKind,
    RunMode,
    choose_cpu_run,
    forced,
    forcing_key,
    lookup_width,
)
from shardq.planning.search import search
from shardq.planning.shortfall import least_extra, refine_error
from shardq.planning.units import Unit, decompose, make_units, tied_groups
from shardq.quant import sizing
from shardq.quant.sizing import TensorEntry


@dataclass
class _Ctx:
    """Everything the placement needs, computed once per plan."""

    units: list[Unit]
    budgets: dict[DeviceKey, int]
    gpus: list[int]
    exec_dev: int | None
    cpu_mode: str
    act: int
    act_fp32: int
    head_act: int
    head_unit: str | None
    quant: QuantConfig
    largest_tensor: int = 0
    workspace: int = 0  # scratch of the CUDA quantized matmuls for the workload (sizing.matmul_workspace_bytes)
    forced: str | None = None  # the user's offload_mode when one string forces every block
    forced_for: dict[str, str] = field(default_factory=dict)  # the user's per-block offload_mode (name -> mode)
    workload: tuple[int, int] = DEFAULT_WORKLOAD
    itemsize: int = 2
    runs: dict[str, RunMode] = field(default_factory=dict)  # unit -> how it runs when placed on "cpu"
    reserve_only: set[DeviceKey] = field(default_factory=set)  # budgets that count reserves but hold no block
    search_complete: bool = True  # the last complete search explored every branch (its "no" is a proof)
    search_steps: int = 200_000  # nodes x units the complete search may visit (about a second)
    extras: Extras = field(default_factory=Extras)  # generation and training reserves (planning.reserves)


@dataclass
class _Assumed:
    """Reserves that depend on later decisions, fixed for one placement pass and raised until they hold."""

    stream: int = 0
    head_on_exec: bool = False
    disk_staging: int = 0
    carried: dict[str, int] = field(default_factory=dict)  # KV cache, LoRA states... of streamed blocks, by name


def plan_model(
    model: nn.Module,
    quant: Any = None,
    max_memory: Mapping[Any, Any] | None = None,
    device_map: str | Mapping[str, Any] = "auto",
    no_split: Sequence[str] | None = None,
    workload: tuple[int, int] = DEFAULT_WORKLOAD,
    gpus: Any = None,
    offload_mode: str | Mapping[str, str] | None = None,
    offload_dir: str | os.PathLike | None = None,
    kv_cache: bool | None = None,
    training: bool | Training = False,
) -> Plan:
    """Plan `model` (meta device is enough) under `max_memory` for the quantization `quant`.

    `device_map` is a strategy ("auto" = "balanced", "balanced_low_0", "sequential") or an accelerate-format dict
    of module names to devices, which is validated and checked against the budgets. `no_split` lists block classes or
    module names kept whole (default: transformers' `_no_split_modules`, else repeated ModuleList children).
    `workload` = (batch, seq_len) sizes the activation reserve. `gpus` plans for hypothetical GPUs
    ("2x24GB"). `offload_mode` forces how CPU blocks run: "cpu" (fp32 on the CPU) or "stream" (to a GPU), one
    string for all or a dict per block (`check_offload_mode`); the others follow `shardq.planning.runmode`.
    `kv_cache` counts generate()'s KV cache and decode graphs for the workload (seq_len = prompt + new tokens);
    None (default) turns it on for causal LMs, False plans plain forwards. `training` (True, or a
    `Training(rank, target_modules)`) counts QLoRA training instead: adapters with their gradients and AdamW
    states, checkpointed hidden states, the recomputed block and the logits' gradient (`planning.reserves`).
    """
    offload_mode = check_offload_mode(model, offload_mode)
    q = QuantConfig.from_any(quant)
    batch, seq_len = check_workload(workload)
    train = check_training(training)
    kv = check_kv_cache(model, kv_cache, train)
    budgets, notes = clip_budgets(
        get_max_memory(max_memory, gpus=gpus, offload_dir=offload_dir), device_capacities(gpus), max_memory is not None
    )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    budgets, reserve_only, host_note = host_for_disk(budgets)
    if not budgets:
        raise PlanError("max_memory names no device: give at least one, e.g. {0: '20GiB', 'cpu': '64GiB'}")
    split_guard = set(no_split) if no_split is not None else set(hf.no_split_modules(model))
    entries = sizing.tensor_entries(model, q)
    ctx = _context(model, q, budgets, entries, split_guard, (batch, seq_len), offload_mode, (kv, train))
    ctx.reserve_only = reserve_only
    device_map = whole_model_map(device_map)
    if isinstance(device_map, Mapping):
        assign = _explicit(model, ctx, device_map, entries, split_guard, gpus, offload_mode, (kv, train))
        strategy = "explicit"
    elif device_map in STRATEGIES:

        def place(c: _Ctx) -> dict[str, DeviceKey]:
            return _place_with_exec_choice(
                c, balanced=device_map != "sequential", low_zero=device_map == "balanced_low_0"
            )

        def fresh(b: dict[DeviceKey, int]) -> _Ctx:
            c = _context(model, q, dict(b), entries, split_guard, (batch, seq_len), offload_mode, (kv, train))
            c.reserve_only = reserve_only
            return c

        assign = _place_exactly(ctx, place, fresh, lambda a: _build(model, ctx, a, device_map, [], (batch, seq_len)))
        strategy = device_map
    else:
        raise PlanError(
            f"device_map={device_map!r} is not a strategy, a device or a dict: use one of {STRATEGIES}, "
            "one device for the whole model (0, 'cuda:1', 'cpu'), or a dict of module names to devices, "
            "e.g. {'model.embed_tokens': 0, 'model.layers': 'cpu', ...}"
        )
    check_forced(ctx.units, ctx.forced_for, assign)
    result = _build(model, ctx, assign, strategy, sorted(split_guard), (batch, seq_len))
    if host_note and "disk" in result.device_map.values():
        warnings.warn(host_note, stacklevel=2)
        notes.append(host_note)
    result.warnings[:0] = notes
    return result


def _explicit(
    model: nn.Module,
    ctx: _Ctx,
    device_map: Mapping[str, Any],
    entries: dict[str, TensorEntry],
    split_guard: set[str],
    gpus: Any,
    offload_mode: str | dict[str, str] | None,
    modes: tuple[bool, Training | None],
) -> dict[str, DeviceKey]:
    """The units of an explicit map and their devices, with `ctx` set for them (units, execution GPU, run modes,
    reserves: the map's entries are the units)."""
    assign, ctx.units = explicit_units(
        model, device_map, entries, ctx.budgets, split_guard, gpus, ctx.forced == "stream"
    )
    refuse_reserve_only(assign, ctx.reserve_only)
    used = sorted(d for d in assign.values() if isinstance(d, int))
    if used:
        ctx.exec_dev = used[0]  # as accelerate: the map's first GPU runs the offloaded blocks
    elif offload_mode is None or (isinstance(offload_mode, dict) and "stream" not in offload_mode.values()):
        ctx.exec_dev, ctx.cpu_mode = None, "cpu"  # a map without GPUs runs on the CPU
    ctx.runs = _cpu_runs(model, ctx)
    _set_extras(model, ctx, modes)
    return assign


def _place_exactly(
    ctx: _Ctx,
    place: Callable[[_Ctx], dict[str, DeviceKey]],
    fresh: Callable[[dict], _Ctx],
    check: Callable[[dict[str, DeviceKey]], Any],
) -> dict[str, DeviceKey]:
    """`place(ctx)`, and when no placement fits, a PlanError whose figure is the least extra memory per device
    that makes one fit (`shardq.planning.shortfall`); `check` raises the over-budget error of a placement."""
    try:
        assign = place(ctx)
        if not _within_budgets(ctx, assign):
            check(assign)
        return assign
    except PlanError as error:

        def feasible(b: dict[DeviceKey, int]) -> bool:
            c = fresh(b)
            c.search_steps = SEARCH_STEPS // 10  # many calls: a lighter complete search each
            try:
                return _within_budgets(c, place(c))
            except PlanError:
                return False

        devices = [d for d in ctx.budgets if d not in ctx.reserve_only]
        ceiling = 2 * sum(max(e.fp32, e.stored) for u in ctx.units for e in u.entries) + 2**30
        ceiling += 2 * sum(sum(c.nbytes(4).values()) for c in ctx.extras.carried.values())
        raise refine_error(error, least_extra(dict(ctx.budgets), feasible, devices, ceiling)) from None


def _context(
    model: nn.Module,
    q: QuantConfig,
    budgets: dict[DeviceKey, int],
    entries: dict[str, TensorEntry],
    split_guard: set[str],
    workload: tuple[int, int],
    offload_mode: str | dict[str, str] | None,
    modes: tuple[bool, Training | None] = (False, None),
) -> _Ctx:
    """The context of one plan; `modes` = (kv_cache, training) as checked (`planning.reserves`)."""
    gpus = [k for k in budgets if isinstance(k, int)]
    exec_dev = next((g for g in gpus if budgets[g] > 0), None)
    per_block = offload_mode if isinstance(offload_mode, dict) else {}
    forced_all = offload_mode if isinstance(offload_mode, str) else None
    streams = (
        ["offload_mode='stream'"]
        if forced_all == "stream"
        else [f"offload_mode[{k!r}]='stream'" for k, m in per_block.items() if m == "stream"]
    )
    if streams and exec_dev is None:
        raise PlanError(
            f"{streams[0]} needs a GPU with a budget > 0 to run streamed blocks: give one in "
            "max_memory, or force 'cpu' instead"
        )
    cpu_mode = forced_all or ("cpu" if q.fp32_cpu_offload or exec_dev is None else "stream")
    dims = sizing.model_dims(model)
    itemsize = compute_itemsize(model, q)
    units = make_units(model, decompose(model, split_guard), entries, split_guard)
    ctx = _Ctx(
        units=units,
        budgets=budgets,
        gpus=gpus,
        exec_dev=exec_dev,
        cpu_mode=cpu_mode,
        act=sizing.activation_bytes(dims, *workload, itemsize),
        act_fp32=sizing.activation_bytes(dims, *workload, 4),
        head_act=sizing.head_bytes(dims, *workload),
        head_unit=head_unit(model, dims, units),
        quant=q,
        largest_tensor=max((e.source_bytes for e in entries.values()), default=0),
        workspace=max(
            sizing.matmul_workspace_bytes(quantized_shapes(model, q), q, workload[0] * workload[1], itemsize),
            expert_workspace(model, q, itemsize),
        ),
        forced=forced_all,
        forced_for=dict(per_block),
        workload=workload,
        itemsize=itemsize,
    )
    ctx.runs = _cpu_runs(model, ctx)
    _set_extras(model, ctx, modes)
    return ctx


def _set_extras(model: nn.Module, ctx: _Ctx, modes: tuple[bool, Training | None]) -> None:
    """The generation and training reserves of `ctx`'s units (`planning.reserves`); `modes` = (kv_cache, training)."""
    decode_ws = sizing.matmul_workspace_bytes(
        quantized_shapes(model, ctx.quant), ctx.quant, ctx.workload[0], ctx.itemsize
    )
    ctx.extras = build_extras(model, [u.name for u in ctx.units], ctx.workload, ctx.itemsize, *modes, decode_ws)


def _cpu_runs(model: nn.Module, ctx: _Ctx) -> dict[str, RunMode]:
    """How each unit runs if placed on "cpu": the user's forced mode, else the rule of `shardq.planning.runmode`."""
    if ctx.forced is not None:
        return {u.name: forced(ctx.forced, f"offload_mode={ctx.forced!r}") for u in ctx.units}
    widths = {u.name: lookup_width(model.get_submodule(u.name) if u.name else model, u.own_only) for u in ctx.units}
    holders: dict[int, list[str]] = {}
    for u in ctx.units:
        for e in u.entries:
            holders.setdefault(e.key, []).append(u.name)
    runs = {}
    for u in ctx.units:
        partners = {n for e in u.entries for n in holders[e.key] if n != u.name and not widths[n]}
        kind = BlockKind(
            widths[u.name], sizing.unique_bytes(u.entries), min(partners) if partners else None, u.own_only
        )
        runs[u.name] = choose_cpu_run(
            kind,
            has_gpu=ctx.exec_dev is not None,
            fp32_cpu_offload=ctx.quant.fp32_cpu_offload,
            workload=ctx.workload,
            itemsize=ctx.itemsize,
        )
        key = forcing_key(u.name, ctx.forced_for)
        if key is not None:
            runs[u.name] = forced(ctx.forced_for[key], f"offload_mode[{key!r}]")
    return runs


def _run(ctx: _Ctx, u: Unit, dev: DeviceKey) -> RunMode:
    """How unit `u` runs when placed on `dev`."""
    if isinstance(dev, int):
        return RunMode("gpu")
    if dev == "disk":
        return RunMode("disk", "disk: read back per forward")
    return ctx.runs[u.name]


def _resident(ctx: _Ctx, dev: DeviceKey, units: list[Unit]) -> bool:
    """Units on `dev` stay where they are (a GPU, or the CPU when they all compute there): never streamed."""
    return isinstance(dev, int) or (dev == "cpu" and all(_run(ctx, u, dev) == "cpu" for u in units))


def _cpu_quantized(ctx: _Ctx, dev: DeviceKey) -> bool:
    """On a machine without a GPU, quantized weights off-GPU stay packed (computed by the reference kernels);
    only fp32_cpu_offload, or a GPU to fall back on, keeps CPU blocks in full fp32."""
    return (
        not isinstance(dev, int)
        and ctx.cpu_mode == "cpu"
        and ctx.exec_dev is None
        and ctx.quant.method != "none"
        and not ctx.quant.fp32_cpu_offload
    )


def _fp32(ctx: _Ctx, u: Unit, dev: DeviceKey) -> bool:
    """Unit `u` on `dev` holds its floating tensors in fp32: it computes on the CPU (disk blocks: stored for the
    default mode of the CPU blocks)."""
    if isinstance(dev, int) or _cpu_quantized(ctx, dev):
        return False
    return (ctx.cpu_mode if dev == "disk" else _run(ctx, u, dev)) == "cpu"


def _bytes(ctx: _Ctx, units: list[Unit], dev: DeviceKey) -> int:
    """Bytes of `units` as placed on `dev`; a tensor tied between an fp32 "cpu" block and a streamed one is
    held twice (the fp32 copy and the streamed block's packed copy), as the dispatcher holds it."""
    entries = [e for u in units for e in u.entries]
    if _cpu_quantized(ctx, dev):  # packed weights as stored, other floats in fp32 where the CPU computes
        quantized = {e.key for e in entries if e.quantized}
        return sizing.unique_bytes([e for e in entries if e.key in quantized]) + sizing.unique_bytes(
            [e for e in entries if e.key not in quantized], fp32=True
        )
    fp32 = [e for u in units if _fp32(ctx, u, dev) for e in u.entries]
    rest = [e for u in units if not _fp32(ctx, u, dev) for e in u.entries]
    return sizing.unique_bytes(fp32, fp32=True) + sizing.unique_bytes(rest)


def _reserve(ctx: _Ctx, dev: DeviceKey, units: list[Unit], assumed: _Assumed) -> dict[str, int]:
    """The working reserve of `dev` holding `units`, by purpose."""
    names = {u.name for u in units}
    if isinstance(dev, int):
        if not units and dev != ctx.exec_dev:
            return {}
        load = max((e.source_bytes + 4 * e.numel for u in units for e in u.entries if e.quantized), default=0)
        head = ctx.head_unit in names or (dev == ctx.exec_dev and assumed.head_on_exec)
        out = {"load": load, "activations": ctx.act + (ctx.head_act if head else 0)}
        if dev == ctx.exec_dev and assumed.stream:
            out["stream"] = assumed.stream
        quantized_here = any(e.quantized for u in units for e in u.entries)
        if ctx.workspace and (quantized_here or (dev == ctx.exec_dev and assumed.stream)):
            out["matmul workspace"] = ctx.workspace
        carried = ctx.extras.carried_bytes(names, ctx.itemsize)
        if dev == ctx.exec_dev:
            carried = add_bytes(carried, assumed.carried)
        return {**out, **carried, **ctx.extras.gpu(head, dev == ctx.exec_dev)}
    if dev == "disk":
        return {"file headers": disk_overhead(ctx.quant, units)} if units else {}
    streams_here = ctx.exec_dev is None and assumed.stream > 0  # no GPU: disk blocks stream into host slots
    if dev == "cpu" and (units or assumed.disk_staging or streams_here):
        out = {"load": ctx.largest_tensor}  # every tensor is read into host memory on its way to its device
        computing = [u.name for u in units if _run(ctx, u, dev) == "cpu"]
        if ctx.exec_dev is None or computing:  # blocks compute on the CPU
            head = ctx.head_unit in names or (ctx.exec_dev is None and assumed.head_on_exec)
            out["activations"] = ctx.act_fp32 + (ctx.head_act if head else 0)
            carried = ctx.extras.carried_bytes(computing, 4)  # CPU blocks compute (and cache) in fp32
            out.update(add_bytes(carried, assumed.carried) if ctx.exec_dev is None else carried)
            out.update(ctx.extras.cpu(head))
        if streams_here:
            out["stream"] = assumed.stream
        if assumed.disk_staging:
            out["disk staging"] = assumed.disk_staging
        return out
    return {}


def _needs(ctx: _Ctx, assign: Mapping[str, DeviceKey], units: list[Unit] | None = None) -> _Assumed:
    """The reserves that `assign` actually needs: two slots of the largest streamed block, the logits of a
    streamed head, and two pinned staging buffers of the largest disk block (double-buffered reads); `units`: only those
    (a partial placement)."""
    streamed = [u for u in (ctx.units if units is None else units) if not _resident(ctx, assign[u.name], [u])]
    disk = [u for u in streamed if assign[u.name] == "disk"]
    return _Assumed(
        stream=2 * max((_bytes(ctx, [u], "disk") for u in streamed), default=0),
        head_on_exec=any(u.name == ctx.head_unit for u in streamed),
        disk_staging=2 * max((_bytes(ctx, [u], "disk") for u in disk), default=0) if "cpu" in ctx.budgets else 0,
        carried=ctx.extras.carried_bytes([u.name for u in streamed], ctx.itemsize if ctx.exec_dev is not None else 4),
    )


def _place_with_exec_choice(ctx: _Ctx, balanced: bool, low_zero: bool = False) -> dict[str, DeviceKey]:
    """Place with the first GPU running streamed blocks; if its stream buffers do not fit, try the other GPUs
    (largest budget first). Returns the first placement within budgets, else the first one found (whose
    overflow the final check reports), else re-raises the first error."""
    first = ctx.exec_dev
    others = sorted((g for g in ctx.gpus if ctx.budgets[g] > 0 and g != first), key=lambda g: -ctx.budgets[g])
    candidates = [first] + others
    fallback: tuple[int | None, dict[str, DeviceKey]] | None = None
    error: PlanError | None = None
    for g in candidates:
        ctx.exec_dev = g
        try:
            assign = _place(ctx, balanced, low_zero)
        except PlanError as exc:
            error = error or exc
            continue
        if _within_budgets(ctx, assign):
            return assign
        fallback = fallback or (g, assign)
    for g in candidates:  # the greedy fill found nothing within budgets: the complete search decides
        ctx.exec_dev = g
        found = _search_fit(ctx)
        if found is not None:
            return found
    if fallback is None:
        raise error or PlanError("no placement found")
    ctx.exec_dev = fallback[0]
    return fallback[1]


def _place(ctx: _Ctx, balanced: bool, low_zero: bool = False) -> dict[str, DeviceKey]:
    """Place units with the strategy.

    Streamed blocks cost two buffers of the largest one on the execution GPU, so the planner tries each
    distinct block size as the streaming limit: blocks above it stay resident (pinned), the stream reserve is
    fixed at twice the limit, and the placement keeping the most weight bytes on the GPUs wins.
    """
    groups = tied_groups(ctx.units)
    caps = _balanced_caps(ctx, groups, low_zero) if balanced else dict(ctx.budgets)
    try:
        return _settle(ctx, groups, caps, [], 0)  # a placement where every block stays resident
    except PlanError:
        pass
    sizes = [_bytes(ctx, g, "disk") for g in groups]
    best: tuple[int, dict[str, DeviceKey]] | None = None
    first: dict[str, DeviceKey] | None = None
    error: PlanError | None = None
    for limit in sorted(set(sizes), reverse=True):
        pinned = [i for i, n in enumerate(sizes) if n > limit]
        for gpu_first in (True, False) if pinned else (True,):
            try:
                assign = _settle(ctx, groups, caps, pinned, 2 * limit, gpu_first)
            except PlanError as exc:
                error = exc if error is None or 0 < exc.missing < error.missing else error
                continue
            first = first or assign
            if _within_budgets(ctx, assign) and (gpu_first or _forced_hold(ctx, assign)):
                score = _gpu_resident(ctx, assign)
                if best is None or score > best[0]:
                    best = (score, assign)
    if best is not None:
        return best[1]
    if first is not None and (error is None or _overrun(ctx, first) <= error.missing):
        return first  # over budget somewhere: the final check names the device
    raise error or PlanError("no placement found")  # the attempt that missed by the least


DEMOTED = "computed on the CPU: streaming it to the GPU does not fit the GPU's budget"


SEARCH_STEPS = 200_000  # nodes x units the complete search may visit (about a second); exhaustive on small models


def _search_fit(ctx: _Ctx, node_limit: int | None = None) -> dict[str, DeviceKey] | None:
    """A placement within budgets found by the complete search (`shardq.planning.search`) when the greedy fill
    found none; blocks the rule streams may compute on the CPU instead (unless the user forced their mode).
    Sets `ctx.runs` to the modes it chose."""
    rule = dict(ctx.runs)
    by_name = {u.name: u for u in ctx.units}
    devices = [d for d in ctx.budgets if (not isinstance(d, int) or ctx.budgets[d] > 0) and d not in ctx.reserve_only]
    keys: dict[int, int] = {}
    for u in ctx.units:
        for k in {e.key for e in u.entries}:
            keys[k] = keys.get(k, 0) + 1

    def options(name: str) -> list[tuple[DeviceKey, RunMode | None]]:
        u = by_name[name]
        out: list[tuple[DeviceKey, RunMode | None]] = []
        for d in devices:
            if d == "cpu":
                out.append((d, rule[name]))
                if rule[name] == "stream" and ctx.forced is None and forcing_key(name, ctx.forced_for) is None:
                    out.append((d, RunMode("cpu", DEMOTED)))
            elif d != "disk" or not u.own_only:
                out.append((d, None))
        return out

    def signature(name: str) -> Any:
        u = by_name[name]
        if any(keys[e.key] > 1 for e in u.entries) or u.own_only or name == ctx.head_unit:
            return name  # tied, nested or the head: unlike any other unit
        load = max((e.source_bytes + 4 * e.numel for e in u.entries if e.quantized), default=0)
        carried = ctx.extras.carried.get(name)
        return (tuple(_bytes(ctx, [u], d) for d in devices), str(rule[name]), load, carried)

    partner = {u.name: g[0].name for g in tied_groups(ctx.units) for u in g}

    def fits(chosen: dict[str, tuple[DeviceKey, RunMode | None]]) -> bool:
        if any(partner[n] in chosen and chosen[partner[n]][0] != c[0] for n, c in chosen.items()):
            return False  # tied tensors are stored once: their units stay together, as the greedy fill keeps them
        for name, (_, run) in chosen.items():
            ctx.runs[name] = run if run is not None else rule[name]
        return _within_budgets(ctx, {n: c[0] for n, c in chosen.items()}, [by_name[n] for n in chosen])

    limit = node_limit if node_limit is not None else ctx.search_steps // max(1, len(ctx.units))
    result = search([u.name for u in ctx.units], options, signature, fits, limit)
    ctx.search_complete = result.complete
    ctx.runs = rule
    if result.choices is None:
        return None
    for name, (_, run) in result.choices.items():
        if run is not None:
            ctx.runs[name] = run
    return {name: dev for name, (dev, _) in result.choices.items()}


def _overrun(ctx: _Ctx, assign: dict[str, DeviceKey]) -> int:
    """Bytes by which the most overfull device of a placement exceeds its budget."""
    need = _needs(ctx, assign)
    over = 0
    for d in ctx.budgets:
        units = [u for u in ctx.units if assign[u.name] == d]
        over = max(over, _bytes(ctx, units, d) + sum(_reserve(ctx, d, units, need).values()) - ctx.budgets[d])
    return over


def _gpu_resident(ctx: _Ctx, assign: dict[str, DeviceKey]) -> int:
    return sum(_bytes(ctx, [u], assign[u.name]) for u in ctx.units if isinstance(assign[u.name], int))


def _settle(
    ctx: _Ctx,
    groups: list[list[Unit]],
    caps: dict[DeviceKey, int],
    pinned: list[int],
    stream: int,
    gpu_first: bool = True,
) -> dict[str, DeviceKey]:
    """Fill with the stream reserve fixed at `stream`, raising the other assumed reserves (logits of a streamed
    head, disk staging, what streamed blocks carry to the execution GPU) until the placement needs no more than
    assumed."""
    assumed = _Assumed(stream=stream)
    for _ in range(SETTLE_ROUNDS):
        assign = _fill(ctx, groups, caps, assumed, pinned, gpu_first)
        need = _needs(ctx, assign)
        if need.stream > stream:
            raise PlanError(f"a streamed block needs {need.stream} bytes of stream buffers, over the {stream} assumed")
        carried = {k: max(v, assumed.carried.get(k, 0)) for k, v in need.carried.items()}
        if (
            need.disk_staging <= assumed.disk_staging
            and (assumed.head_on_exec or not need.head_on_exec)
            and all(v <= assumed.carried.get(k, 0) for k, v in need.carried.items())
        ):
            return assign
        assumed = _Assumed(
            stream,
            assumed.head_on_exec or need.head_on_exec,
            max(assumed.disk_staging, need.disk_staging),
            {**assumed.carried, **carried},
        )
    raise PlanError("the planner did not settle on its reserves; report this model to shardq")


SETTLE_ROUNDS = 32  # fills per assumed stream size: each raises the assumed reserves to what the last one needed


def _forced_hold(ctx: _Ctx, assign: dict[str, DeviceKey]) -> bool:
    """Every name the user forced a mode for still covers a block placed on "cpu" (`check_forced`)."""
    try:
        check_forced(ctx.units, ctx.forced_for, assign)
    except PlanError:
        return False
    return True


def _within_budgets(ctx: _Ctx, assign: Mapping[str, DeviceKey], units: list[Unit] | None = None) -> bool:
    """Every device's placed bytes plus reserve within its budget (`units`: only those, a partial placement)."""
    units = ctx.units if units is None else units
    need = _needs(ctx, assign, units)
    for d in ctx.budgets:
        here = [u for u in units if assign[u.name] == d]
        if _bytes(ctx, here, d) + sum(_reserve(ctx, d, here, need).values()) > ctx.budgets[d]:
            return False
    return True


def _fill(
    ctx: _Ctx,
    groups: list[list[Unit]],
    caps: dict[DeviceKey, int],
    assumed: _Assumed,
    pinned: list[int],
    gpu_first: bool = True,
) -> dict[str, DeviceKey]:
    """Pinned groups (kept from streaming) on the first device with room where they stay resident (a GPU, or the
    CPU when it computes), then a sequential fill: each group on the current device if it
    fits with the reserve, else on the next one. Groups holding a module's own tensors (nested entries) are
    never offloaded: they go to the first GPU with room, or the CPU when it computes. `gpu_first=False` leaves
    the GPUs to the pinned groups that can stay resident nowhere else: those are placed first, and the others
    (lookups that run on the CPU, such as a large embedding) take the CPU where it has room."""
    devices = [d for d in ctx.budgets if (not isinstance(d, int) or ctx.budgets[d] > 0) and d not in ctx.reserve_only]
    held: dict[DeviceKey, list[Unit]] = {d: [] for d in devices}
    assign: dict[str, DeviceKey] = {}

    def fits(dev: DeviceKey, trial: list[Unit]) -> bool:
        return _bytes(ctx, trial, dev) + sum(_reserve(ctx, dev, trial, assumed).values()) <= caps[dev]

    def resident_on(gi: int) -> list[DeviceKey]:
        where = [d for d in devices if _resident(ctx, d, groups[gi])]
        return where if gpu_first else sorted(where, key=lambda d: isinstance(d, int))

    nested = [i for i, g in enumerate(groups) if any(u.own_only for u in g) and i not in pinned]
    order = list(pinned) + nested
    if not gpu_first:
        order.sort(key=lambda gi: any(not isinstance(d, int) for d in resident_on(gi)))
    for gi in order:
        resident = resident_on(gi)
        dev = next((d for d in resident if fits(d, held[d] + groups[gi])), None)
        if dev is None:
            room = {
                d: caps[d] - _bytes(ctx, held[d], d) - sum(_reserve(ctx, d, held[d], assumed).values())
                for d in resident
            }
            target = max(room, key=lambda d: room[d]) if room else None
            raise _missing_error(ctx, [groups[gi]], held, caps, assumed, devices, target)
        held[dev] += groups[gi]
        assign.update({u.name: dev for u in groups[gi]})
    di = 0
    for gi, group in enumerate(groups):
        if gi in pinned or gi in nested:
            continue
        while di < len(devices) and not fits(devices[di], held[devices[di]] + group):
            di += 1
        if di == len(devices):
            left = [g for i, g in enumerate(groups[gi:], gi) if i not in pinned and i not in nested]
            raise _missing_error(ctx, left, held, caps, assumed, devices)
        held[devices[di]] += group
        assign.update({u.name: devices[di] for u in group})
    return assign


def _balanced_caps(ctx: _Ctx, groups: list[list[Unit]], low_zero: bool = False) -> dict[DeviceKey, int]:
    """Per-GPU caps that spread the model evenly when it fits on the GPUs; the last GPU keeps its budget.
    `low_zero` ("balanced_low_0", as accelerate): spread over the other GPUs, and leave the first GPU only what
    they cannot hold (it keeps room for generate()'s work)."""
    gpus = [g for g in ctx.gpus if ctx.budgets[g] > 0]
    caps = dict(ctx.budgets)
    if len(gpus) < 2:
        return caps
    total = _bytes(ctx, ctx.units, gpus[0]) + _carried_total(ctx, ctx.units)
    biggest = max((_bytes(ctx, g, gpus[0]) + _carried_total(ctx, g) for g in groups), default=0)
    largest_load = max((e.source_bytes + 4 * e.numel for u in ctx.units for e in u.entries if e.quantized), default=0)
    per_gpu_reserve = ctx.act + ctx.head_act + largest_load + sum(ctx.extras.gpu(False, False).values())
    if total + len(gpus) * per_gpu_reserve > sum(ctx.budgets[g] for g in gpus):
        return caps
    spread = gpus[1:] if low_zero else gpus
    share = -(-total // len(spread)) + biggest // 2 + per_gpu_reserve  # half a block of slack per GPU
    for g in spread[:-1]:
        caps[g] = min(ctx.budgets[g], share)
    if low_zero:
        room = sum(caps[g] - per_gpu_reserve for g in spread)
        caps[gpus[0]] = min(ctx.budgets[gpus[0]], max(0, total - room) + per_gpu_reserve)
    return caps


def _carried_total(ctx: _Ctx, units: list[Unit]) -> int:
    """Bytes `units` carry to the GPU that executes them (KV cache, LoRA states, checkpoints)."""
    return sum(ctx.extras.carried_bytes([u.name for u in units], ctx.itemsize).values())


def _missing_error(
    ctx: _Ctx,
    left: list[list[Unit]],
    held: dict[DeviceKey, list[Unit]],
    caps: dict[DeviceKey, int],
    assumed: _Assumed,
    devices: list[DeviceKey],
    target: DeviceKey | None = None,
) -> PlanError:
    """How many bytes do not fit and where the model stopped (on `target`, default the last device), with what
    to change."""
    last = target if target is not None else (devices[-1] if devices else "cpu")
    units = [u for g in left for u in g]
    rows = []
    for d in devices:
        detail = _reserve(ctx, d, held[d], assumed)
        rows.append(
            f"{device_label(d)}: {format_size(_bytes(ctx, held[d], d))} weights + {format_size(sum(detail.values()))} "
            f"reserve ({_fmt_detail(detail)}) of {format_size(ctx.budgets[d])}"
        )
    need = _bytes(ctx, units, last)
    everything = held.get(last, []) + units
    missing = max(
        1, _bytes(ctx, everything, last) + sum(_reserve(ctx, last, everything, assumed).values()) - caps.get(last, 0)
    )
    where = f" on {device_label(last)}" if target is not None else ""
    biggest = max(ctx.budgets.values(), default=0)
    one = _bytes(ctx, left[0], last)
    why = (
        f" block {left[0][0].name!r} alone needs {format_size(one)}, more than any device's budget "
        f"(largest {format_size(biggest)});"
        if one > biggest
        else ""
    )
    hint = "" if "disk" in ctx.budgets else " add 'disk' to max_memory to offload the rest to disk, or"
    if "disk" in ctx.budgets and "cpu" in ctx.budgets:
        no_gpu = ctx.exec_dev is None
        slots = "two staging buffers" + (" and two stream slots" if no_gpu else "")
        why += (
            f" a block on disk still needs {slots} of its size in CPU memory"
            f" ({format_size((4 if no_gpu else 2) * _bytes(ctx, left[0], 'disk'))} for {left[0][0].name!r});"
        )
    error = PlanError(
        f"the model does not fit in max_memory: about {format_size(missing)} ({missing} bytes) are missing;{why} "
        f"{len(units)} block(s) from {left[0][0].name!r} on ({format_size(need)}) found no room{where}. "
        f"Devices: {'; '.join(rows) or 'none'}. To fix:{hint} raise the caps, quantize (quant='nf4' or 'int8'), "
        "or shrink the workload (batch, seq_len)." + ctx.extras.hint()
    )
    error.missing = missing
    return error


def _build(
    model: nn.Module,
    ctx: _Ctx,
    assign: dict[str, DeviceKey],
    strategy: str,
    no_split: list[str],
    workload: tuple[int, int],
) -> Plan:
    """Assemble the Plan and check every budget (explicit maps are checked here; strategies already hold)."""
    need = _needs(ctx, assign)
    held: dict[DeviceKey, list[Unit]] = {d: [] for d in ctx.budgets}
    for u in ctx.units:
        held[assign[u.name]].append(u)
    totals = {d: _bytes(ctx, held[d], d) for d in ctx.budgets}
    detail = {d: _reserve(ctx, d, held[d], need) for d in ctx.budgets}
    reserves = {d: sum(v.values()) for d, v in detail.items()}
    for d in ctx.budgets:
        if totals[d] + reserves[d] > ctx.budgets[d]:
            over = totals[d] + reserves[d] - ctx.budgets[d]
            stream = (
                " The stream reserve is two slots of the largest block read back from the CPU or disk for "
                "each forward: give the CPU room for more blocks, quantize, or use offload_mode='cpu' to "
                "compute CPU blocks there."
                if detail[d].get("stream")
                else ""
            )
            raise PlanError(
                f"{device_label(d)} would hold {format_size(totals[d])} of weights + {format_size(reserves[d])} "
                f"reserve ({_fmt_detail(detail[d])}), {format_size(over)} ({over} bytes) over its "
                f"max_memory of {format_size(ctx.budgets[d])}: move modules off {device_label(d)}, raise its "
                f"cap, or shrink the workload (batch, seq_len).{stream}{ctx.extras.hint()}"
            )
    placements = [_placement(ctx, u, assign[u.name]) for u in ctx.units]
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()), "float32")
    return Plan(
        placements=placements,
        device_map={u.name: assign[u.name] for u in ctx.units},
        budgets=dict(ctx.budgets),
        reserves=reserves,
        reserve_detail=detail,
        totals=totals,
        quant=ctx.quant,
        strategy=strategy,
        execution_device=ctx.exec_dev,
        workload=workload,
        dtype=dtype,
        cpu_mode=ctx.cpu_mode,
        tied_groups=hf.tied_parameter_groups(model),
        no_split=no_split,
        warnings=(
            tie_warnings(ctx.units, assign) + unquantized_warnings(model, ctx.quant) + expert_warnings(model, ctx.quant)
        ),
        source=type(model).__name__,
        offload_mode=ctx.forced or (dict(ctx.forced_for) or None),
        kv_cache=ctx.extras.kv_cache,
        training=ctx.extras.training,
    )


def _fmt_detail(detail: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {format_size(v)}" for k, v in detail.items() if v) or "none"


def _placement(ctx: _Ctx, u: Unit, dev: DeviceKey) -> Placement:
    quantized = any(e.quantized for e in u.entries)
    if _fp32(ctx, u, dev) or (_cpu_quantized(ctx, dev) and not quantized):
        storage = "fp32"
    elif quantized:
        storage = ctx.quant.method
    else:
        storage = next((str(e.dtype).removeprefix("torch.") for e in u.entries if e.dtype.is_floating_point), "int")
    params = sum({e.key: e.numel for e in u.entries}.values())
    run = _run(ctx, u, dev)
    return Placement(u.name, dev, _bytes(ctx, [u], dev), storage, str(run), params, u.own_only, run.reason)


def plan(source: Any, quant: Any = None, *, dtype: torch.dtype | str | None = None, **kwargs: Any) -> Plan:
    """Plan a model object, or a checkpoint directory (config.json + safetensors) from its headers alone.

    For a directory, the model is built on the meta device in `dtype` (default: the checkpoint's floating
    dtype), `quant` defaults to the config's `quantization_config`, and the checkpoint's tensor names and
    shapes are checked against the model: differences land in `Plan.mismatches`. Other keyword arguments
    go to `plan_model`.
    """
    if isinstance(source, nn.Module):
        return plan_model(source, quant, **kwargs)
    if not isinstance(source, (str, os.PathLike)):
        raise PlanError(f"cannot plan a {type(source).__name__}: give an nn.Module or a checkpoint directory path")
    from shardq.checkpoint.index import index_checkpoint

    path = os.fspath(source)
    config = hf.load_config(path)
    index = index_checkpoint(path)
    if quant is None and getattr(config, "quantization_config", None) is not None:
        quant = config.quantization_config
    model = hf.meta_model_from_config(config, resolve_dtype(dtype) or checkpoint_dtype(index))
    result = plan_model(model, quant, **kwargs)
    from shardq.checkpoint.conversions import apply_conversions
    from shardq.checkpoint.source import checkpoint_source

    converted, problems = apply_conversions(model, checkpoint_source(index))  # transformers 5 renames and fusions
    result.mismatches = problems + check_checkpoint(model, converted)
    result.source = path
    return result
