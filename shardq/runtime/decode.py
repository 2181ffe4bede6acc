"""Graph-captured decode: the callable transformers' static-cache `generate()` runs each new token through.

transformers 5 asks a model for a faster decode step with `model.get_compiled_call(compile_config)` whenever the
cache is static (`cache_implementation="static"`, a `GenerationConfig` saying so, or a `StaticCache` passed in) and
the model runs on a GPU. A dispatched model answers with its `GraphDecoder` instead of `torch.compile` unless the
user asked for a compile (`shardq.runtime.model_class` has the rule): transformers' own loop (sampling, stopping,
padding, masks) stays as it is; only the forward of a one-token step is replayed from CUDA graphs.

- Prefill (more than one token) and the first step of each new shape run eagerly (the warm-up: lazy kernel and
  cuBLAS set-up happen outside capture); the next step of that shape is captured, later ones replayed. A new batch
  size, dtype or mask shape is a new signature: captured again, older graphs kept.
- Every block resident on one GPU (the main device): the whole step is one graph, no Python runs per token.
- Otherwise the step is cut by `graphs.split_runs`: consecutive GPU-resident blocks on one GPU form one graph each;
  streamed and disk blocks run eagerly with their prefetch (the copy is not captured), CPU-run blocks eagerly too.
- A new `StaticCache` of the same shapes (each `generate()` makes one) is adopted: its contents are copied into the
  cache tensors the graphs were captured with, and its layers are pointed at those tensors.

`set_graph_decode(model, True)` makes static-cache graph decode the model's default for `generate()`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardq.runtime import graphs
from shardq.runtime.graphs import Call, joins_run, storage_key, tensors_of

CACHE_TENSORS = ("keys", "values", "cumulative_length")
# Captured steps kept per model (one per signature: batch, dtype, cache length); the least recently used beyond
# this are freed with the cache they were captured on.
MAX_STEPS = 4
# Blocks that run on the CPU are eager; tests set this to capture them with graphs.ReplayGraph (the CPU stand-in of
# a CUDA graph), so CI runs the run/buffer logic of the GPU path.
CAPTURE_CPU = False


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def is_decode_step(args: tuple, kwargs: dict) -> bool:
    """A one-token step on a static (compileable) cache, without gradients: what the graphs replay."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if kwargs.get("inputs_embeds") is not None:
        ids = kwargs["inputs_embeds"][..., 0]
    cache = _cache_of(kwargs)
    return (
        isinstance(ids, torch.Tensor)
        and ids.dim() == 2
        and ids.shape[1] == 1
        and not torch.is_grad_enabled()
        and getattr(cache, "is_compileable", False)
        and window_never_fills(cache)
    )


def window_never_fills(cache: Any) -> bool:
    """A sliding-window layer shorter than the cache switches its update rule on a host counter once full, which a
    captured step cannot follow: such caches decode eagerly. Windows as long as the cache never fill."""
    return all(
        getattr(layer, "_is_croppable", True)
        for layer in getattr(cache, "layers", ())
        if hasattr(layer, "cumulative_length_int")
    )


def adopt_cache(captured: Any, new: Any) -> bool:
    """Point `new` cache's layers at `captured`'s tensors after copying its contents there; False if the layers'
    shapes differ (then the step must be captured again)."""
    old_layers, new_layers = getattr(captured, "layers", None), getattr(new, "layers", None)
    if old_layers is None or new_layers is None or len(old_layers) != len(new_layers):
        return False
    pairs = []
    for old, fresh in zip(old_layers, new_layers):
        for attr in CACHE_TENSORS:
            a, b = getattr(old, attr, None), getattr(fresh, attr, None)
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
                return False
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
                    return False
                pairs.append((fresh, attr, a, b))
    for fresh, attr, a, b in pairs:
        if a.data_ptr() != b.data_ptr():
            a.copy_(b)
            setattr(fresh, attr, a)
    for old, fresh in zip(old_layers, new_layers):  # host-side length of sliding layers (read by the CPU stand-in)
        if hasattr(fresh, "cumulative_length_int"):
            old.cumulative_length_int = fresh.cumulative_length_int
    return True


def capture_device(block: Any) -> torch.device | None:
    """Where a block's calls are captured: its GPU when resident there; None (eager) for streamed, disk and
    CPU-run blocks (CPU-run ones are captured by the CPU stand-in when `CAPTURE_CPU`)."""
    if block.mode == "gpu" or (CAPTURE_CPU and block.mode == "cpu"):
        return block.exec_device
    return None


def host_counters(cache: Any) -> list[int]:
    """Host-side token counts of sliding-window layers (transformers reads them for masks and positions)."""
    return [
        layer.cumulative_length_int for layer in getattr(cache, "layers", ()) if hasattr(layer, "cumulative_length_int")
    ]


def set_host_counters(caches: tuple, values: list[int]) -> None:
    """A replayed step runs no Python, so the counters its eager update would advance are set here."""
    for cache in caches:
        layers = [layer for layer in getattr(cache, "layers", ()) if hasattr(layer, "cumulative_length_int")]
        for layer, v in zip(layers, values):
            layer.cumulative_length_int = v


def _same_tensors(a: Any, b: Any) -> bool:
    """Whether two caches already share their layer tensors (an adopted cache handed back by the step's output)."""
    la, lb = getattr(a, "layers", None) or [], getattr(b, "layers", None) or []
    return (
        bool(la)
        and len(la) == len(lb)
        and all(
            isinstance(getattr(x, "keys", None), torch.Tensor) and x.keys is getattr(y, "keys", None)
            for x, y in zip(la, lb)
        )
    )


def _point_output_at(out: Any, cache: Any) -> None:
    """The captured output names the cache of capture time; hand back the live one (same tensors after adoption)."""
    for name in ("cache", "past_key_values"):
        if isinstance(out, dict) and out.get(name) is not None and out[name] is not cache:
            out[name] = cache


def _whole_step_device(rt: Any) -> torch.device | None:
    """The device that holds every block, when one does (then the step is one graph)."""
    devices = {capture_device(b) for b in rt.blocks.values()}
    return rt.main_device if devices == {rt.main_device} else None


@dataclass
class _Rec:
    """One block call of a captured piecewise step."""

    name: str
    run: int | None  # graph index; None = eager
    first: bool = False
    copies: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (input leaf index, static buffer)
    out: Any = None


@dataclass
class Step:
    """The graphs of one signature: static root inputs, then one whole graph or piecewise runs."""

    static: tuple  # (args, kwargs) with static tensors
    cache: Any
    whole: graphs.CudaGraph | graphs.ReplayGraph | None = None
    out: Any = None
    runs: list = field(default_factory=list)
    recs: list[_Rec] = field(default_factory=list)
    pos: int = 0
    capturing: bool = False
    static_keys: set = field(default_factory=set)
    open_device: torch.device | None = None


class GraphDecoder:
    """Replays the decode steps of one dispatched model from graphs (see the module docstring)."""

    def __init__(self, model: nn.Module, rt: Any) -> None:
        self.model, self.rt = model, rt
        self.whole_device = _whole_step_device(rt)
        self.steps: OrderedDict[tuple, Step] = OrderedDict()  # most recently used last
        self.warm: set[tuple] = set()
        self.pools: dict[torch.device, Any] = {}
        self.active: Step | None = None
        self.stats = {"eager": 0, "captures": 0, "replays": 0, "adopted": 0}
        self._wrapped: list[tuple[nn.Module, Any]] = []
        if self.whole_device is None:
            self._wrap_blocks()

    # ---- entry
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not is_decode_step(args, kwargs):
            self.stats["eager"] += 1
            return self.model(*args, **kwargs)
        key = graphs.signature((args, kwargs))
        step = self.steps.get(key)
        if step is not None:
            self.steps.move_to_end(key)
            return self._replay(step, args, kwargs)
        if key not in self.warm:  # warm-up: lazy initialisation happens outside any capture
            self.warm.add(key)
            self.stats["eager"] += 1
            return self.model(*args, **kwargs)
        return self._capture(key, args, kwargs).out

    def _capture(self, key: tuple, args: tuple, kwargs: dict) -> Step:
        sargs, skw = graphs.static_copy((args, kwargs))
        step = Step((sargs, skw), _cache_of(kwargs))
        step.static_keys = {storage_key(t) for t in tensors_of((sargs, skw))}
        self.stats["captures"] += 1
        if self.whole_device is not None:
            g = graphs.new_graph(self.whole_device, self.pools)
            g.begin()
            step.out = self.model(*sargs, **skw)
            g.record(self.model, sargs, skw, step.out)
            g.end()
            if not g.runs_on_capture:
                g.replay()
            step.whole = g
        else:
            step.capturing = True
            self.active = step
            try:
                step.out = self.model(*sargs, **skw)
                self._close(step)
            finally:
                self.active, step.capturing = None, False
        self.steps[key] = step
        while len(self.steps) > MAX_STEPS:  # each step holds its static inputs and the cache it was captured on
            self.steps.popitem(last=False)
        return step

    def _replay(self, step: Step, args: tuple, kwargs: dict) -> Any:
        cache = _cache_of(kwargs)
        if cache is not step.cache and not _same_tensors(step.cache, cache):
            if not adopt_cache(step.cache, cache):
                raise RuntimeError(
                    "a new cache of different shapes reached a captured decode step; call "
                    "shardq.runtime.decode.reset_graphs(model) before generating with it"
                )
            self.stats["adopted"] += 1  # step.cache stays the capture-time object the static inputs name
        graphs.copy_leaves(tensors_of(step.static), tensors_of((args, kwargs)))
        self.stats["replays"] += 1
        counters = host_counters(cache)
        if step.whole is not None:
            step.whole.replay()
            _point_output_at(step.out, cache)
            out = step.out
        else:
            step.pos = 0
            self.active = step
            try:
                out = self.model(*step.static[0], **step.static[1])
            finally:
                self.active = None
        set_host_counters((cache, step.cache), [c + 1 for c in counters])
        return out

    # ---- piecewise: block wrappers
    def _wrap_blocks(self) -> None:
        modules = dict(self.model.named_modules(remove_duplicate=False))
        for b in self.rt.blocks.values():
            device = capture_device(b)
            module = modules[b.name]
            inner = module.forward
            self._wrapped.append((module, module.__dict__.get("forward")))
            module.forward = self._block_forward(b.name, device, inner)

    def _block_forward(self, name: str, device: torch.device | None, inner: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            step = self.active
            if step is None:
                return inner(*args, **kwargs)
            if step.capturing:
                return self._capture_call(step, name, device, inner, args, kwargs)
            return self._replay_call(step, name, inner, args, kwargs)

        return forward

    def _capture_call(
        self, step: Step, name: str, device: torch.device | None, inner: Any, args: tuple, kwargs: dict
    ) -> Any:
        if device is None:
            self._close(step)
            step.recs.append(_Rec(name, None))
            return inner(*args, **kwargs)
        ins = tensors_of((args, kwargs))
        foreign = [i for i, t in enumerate(ins) if storage_key(t) not in step.static_keys]
        rec = _Rec(name, len(step.runs) - 1)
        if not joins_run(step.open_device, Call(name, device, bool(foreign))):
            self._close(step)
            rec.copies = [(i, ins[i].clone()) for i in foreign]
            args, kwargs = graphs.rebuild((args, kwargs), {id(ins[i]): s for i, s in rec.copies})
            step.runs.append(graphs.new_graph(device, self.pools))
            rec.run, rec.first, step.open_device = len(step.runs) - 1, True, device
            step.runs[-1].begin()
        out = inner(*args, **kwargs)
        step.runs[-1].record(inner, args, kwargs, out)
        step.static_keys.update(storage_key(t) for t in tensors_of(out))
        rec.out = out
        step.recs.append(rec)
        return out

    def _close(self, step: Step) -> None:
        if step.open_device is None:
            return
        g = step.runs[-1]
        step.open_device = None
        g.end()
        if not g.runs_on_capture:
            g.replay()

    def _replay_call(self, step: Step, name: str, inner: Any, args: tuple, kwargs: dict) -> Any:
        rec = step.recs[step.pos] if step.pos < len(step.recs) else None
        step.pos += 1
        if rec is None or rec.name != name:
            raise RuntimeError(
                f"decode step called block {name!r} where the captured step called "
                f"{rec.name if rec else 'nothing'!r}; the forward must take the same path every "
                "token (call shardq.runtime.decode.reset_graphs(model) after changing the model)"
            )
        if rec.run is None:
            return inner(*args, **kwargs)
        if rec.first:
            ins = tensors_of((args, kwargs))
            graphs.copy_leaves([s for _, s in rec.copies], [ins[i] for i, _ in rec.copies])
            step.runs[rec.run].replay()
        return rec.out

    def graph_count(self) -> int:
        """Graphs held: one per whole step, else one per run of each captured step."""
        return sum(1 if s.whole is not None else len(s.runs) for s in self.steps.values())

    def close(self) -> None:
        """Drop every graph and restore the block forwards."""
        for module, previous in reversed(self._wrapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._wrapped.clear()
        self.steps.clear()
        self.warm.clear()


def decoder_of(model: nn.Module) -> GraphDecoder:
    """The model's graph decoder (made on first use)."""
    rt = getattr(model, "shardq_runtime", None)
    if rt is None:
        raise ValueError("graph decode needs a model returned by shardq.dispatch_model or shardq.load_sharded")
    if rt.decoder is None:
        rt.decoder = GraphDecoder(model, rt)
    return rt.decoder


def reset_graphs(model: nn.Module) -> None:
    """Free the captured graphs and the fast loops' graphs and caches (made again on the next decode)."""
    rt = getattr(model, "shardq_runtime", None)
    if rt is not None:
        rt.fast = None
    if rt is not None and rt.decoder is not None:
        rt.decoder.close()
        rt.decoder = None


def set_graph_decode(model: nn.Module, enabled: bool = True, fuse: bool = False) -> nn.Module:
    """Make graph-captured decode the default of `model.generate()` (a static cache unless the call asks for
    another), or turn it off (`enabled=False`: transformers' own `torch.compile` path then serves static caches).

    `fuse=True` compiles the fast loop's token step with torch.compile (inductor) before capturing it: a resident
    model's step is then a few hundred fused kernels instead of ~45 per decoder layer, at the price of a compile
    (tens of seconds) on the first generate() of each batch size."""
    rt = getattr(model, "shardq_runtime", None)
    if rt is None:
        raise ValueError("set_graph_decode needs a model returned by shardq.dispatch_model or shardq.load_sharded")
    rt.graph_decode = enabled
    rt.graph_fuse = enabled and fuse
    cfg = getattr(model, "generation_config", None)
    if cfg is not None:
        cfg.cache_implementation = "static" if enabled else None
    if not enabled:
        reset_graphs(model)
    return model
