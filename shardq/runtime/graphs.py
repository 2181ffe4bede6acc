"""Captured step graphs: static input buffers, capture, replay, and the rule that cuts a step into runs.

A decode step is replayed from graphs whose inputs live in static buffers (copied into before each replay) and whose
outputs are the tensors the capture produced (overwritten by each replay, so a caller reads them before the next
step). Two graph kinds share one interface (`begin` / `end` / `replay`):

- `CudaGraph`: a `torch.cuda.CUDAGraph` captured on one GPU; all graphs of a model share one memory pool per GPU.
- `ReplayGraph`: the CPU stand-in used where no capture exists (CPU-run models, tests in CI): it records the
  block calls made while "capturing" and replays them on the same static inputs, writing each result into the
  tensors returned at capture. It exercises every buffer and run decision of the CUDA path, without the speed.

`split_runs` is the segmentation rule: consecutive capturable calls on one device form a run (one graph) unless a
call takes a tensor that is neither a static input of the run nor produced inside it; eager calls (CPU-run,
streamed, disk blocks) end runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Path = tuple  # position of a leaf inside nested args/kwargs


def leaves(obj: Any, path: Path = ()) -> list[tuple[Path, Any]]:
    """(path, value) of every tensor and plain value inside tuples, lists, dicts and dataclasses, in order.

    Other objects (a transformers Cache) are one opaque leaf: their tensors are static by construction.
    """
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str, torch.dtype)):
        return [(path, obj)]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in leaves(v, path + (i,))]
    if isinstance(obj, Mapping):
        return [x for k, v in obj.items() for x in leaves(v, path + (k,))]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [x for f in dataclasses.fields(obj) for x in leaves(getattr(obj, f.name), path + (f.name,))]
    return [(path, obj)]


def signature(obj: Any) -> tuple:
    """What a captured graph depends on: each tensor leaf's shape, dtype, device, stride; plain values as they are;
    opaque objects by type (a new Cache of the same shapes is adopted, not re-captured)."""
    out: list[tuple] = []
    for path, v in leaves(obj):
        if isinstance(v, torch.Tensor):
            out.append((path, tuple(v.shape), v.dtype, v.device, v.stride()))
        elif v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
            out.append((path, v))
        else:
            out.append((path, type(v).__name__))
    return tuple(out)


def tensors_of(obj: Any) -> list[torch.Tensor]:
    return [v for _, v in leaves(obj) if isinstance(v, torch.Tensor)]


def static_copy(obj: Any) -> Any:
    """`obj` with every tensor replaced by a fresh clone (the static input buffers of a graph)."""
    return rebuild(obj, {id(t): t.clone() for t in tensors_of(obj)})


def rebuild(obj: Any, swap: dict[int, torch.Tensor]) -> Any:
    """`obj` with tensors whose id is in `swap` replaced (containers rebuilt, other objects kept)."""
    if isinstance(obj, torch.Tensor):
        return swap.get(id(obj), obj)
    if isinstance(obj, (list, tuple)):
        items = [rebuild(v, swap) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, Mapping):
        moved = {k: rebuild(v, swap) for k, v in obj.items()}
        cls: Callable[..., Any] = type(obj)  # a concrete mapping class, whose constructor Mapping does not declare
        try:
            return cls(**moved) if dataclasses.is_dataclass(obj) else cls(moved)
        except TypeError:
            return moved
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: rebuild(getattr(obj, f.name), swap) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


def copy_leaves(static: list[torch.Tensor], new: list[torch.Tensor]) -> None:
    """Copy new inputs into a graph's static buffers (skipping a buffer passed back as itself)."""
    for s, n in zip(static, new):
        if s.data_ptr() != n.data_ptr():
            s.copy_(n, non_blocking=True)


def storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr())


# --------------------------------------------------------------------------------------------------------------
# the segmentation rule


@dataclass(frozen=True)
class Call:
    """One block call of a step as the run rule sees it: its device when it can be captured (None: eager), and
    whether it takes a tensor from outside the run that would be open when it starts."""

    name: str
    device: torch.device | None
    foreign_input: bool = False


def joins_run(open_device: torch.device | None, call: Call) -> bool:
    """Whether `call` continues the run open on `open_device` (None: no run open)."""
    return open_device is not None and call.device == open_device and not call.foreign_input


def split_runs(calls: list[Call]) -> list[list[str]]:
    """The graphs one step is cut into: lists of consecutive capturable block names (eager calls belong to none)."""
    runs: list[list[str]] = []
    open_device: torch.device | None = None
    for call in calls:
        if call.device is None:
            open_device = None
        elif joins_run(open_device, call):
            runs[-1].append(call.name)
        else:
            runs.append([call.name])
            open_device = call.device
    return runs


# --------------------------------------------------------------------------------------------------------------
# graph kinds


class CudaGraph:
    """One CUDA graph on `device`, captured between `begin()` and `end()` into the shared `pool`."""

    runs_on_capture = False  # capture records kernels without running them: replay once right after

    def __init__(self, device: torch.device, pool: Any) -> None:
        self.device, self.pool = device, pool
        self.graph = torch.cuda.CUDAGraph()
        self._ctx: Any = None

    def begin(self) -> None:
        torch.cuda.synchronize(self.device)
        self._ctx = torch.cuda.graph(self.graph, pool=self.pool)
        with torch.cuda.device(self.device):
            self._ctx.__enter__()

    def record(self, fn: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        """Nothing to keep: the kernels are in the graph."""

    def end(self) -> None:
        ctx, self._ctx = self._ctx, None
        with torch.cuda.device(self.device):
            ctx.__exit__(None, None, None)

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class ReplayGraph:
    """The CPU stand-in: replays the recorded calls on their static inputs into the captured outputs."""

    device: torch.device
    calls: list[tuple[Callable, tuple, dict, list[torch.Tensor]]] = field(default_factory=list)
    runs_on_capture = True

    def begin(self) -> None:
        self.calls.clear()

    def record(self, fn: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        self.calls.append((fn, args, kwargs, tensors_of(out)))

    def end(self) -> None:
        """Capture leaves the calls' outputs computed (as replaying a CUDA graph right after capture would)."""

    def replay(self) -> None:
        for fn, args, kwargs, outs in self.calls:
            fresh = tensors_of(fn(*args, **kwargs))
            if len(fresh) != len(outs):
                raise RuntimeError("a replayed call returned a different number of tensors than at capture")
            for o, f in zip(outs, fresh):
                o.copy_(f)


def new_graph(device: torch.device, pools: dict[torch.device, Any]) -> CudaGraph | ReplayGraph:
    """A graph for `device`: CUDA graphs on GPUs (one pool per GPU, shared by all graphs of a model)."""
    if device.type != "cuda":
        return ReplayGraph(device)
    if device not in pools:
        pools[device] = torch.cuda.graph_pool_handle()
    return CudaGraph(device, pools[device])
