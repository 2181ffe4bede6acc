"""Reserves of generation and training, on top of the planner's load, activation, stream and scratch reserves.

Memory a block carries to the device that executes it (its GPU; the execution GPU when it is streamed from the CPU or
read from disk; the CPU, in fp32, when it computes there), summed over the blocks each device executes:
  kv cache     generation (`kv_cache`): every attention layer's K and V, as transformers' `StaticCache`
               preallocates them (a dynamic cache grows to the same): 2 x batch x cache_len x kv_heads x head_dim
               x itemsize, cache_len = the workload's seq_len (the whole context: prompt + new tokens), capped at
               the layer's sliding window (or attention chunk); kv_heads = num_key_value_heads (num_kv_heads,
               n_head_kv; 1 for multi-query), else the attention heads; head_dim = config.head_dim, else
               hidden / heads.
  lora states  training: each targeted linear [out, in] adds rank x (in + out) parameters, held with their
               gradient and AdamW's two moments, all fp32: 16 bytes per parameter.
  checkpoints  training: activation checkpointing keeps each attention layer's input hidden state for the
               backward: batch x seq_len x hidden x itemsize per layer.
Working memory of each GPU that executes blocks (the execution GPU always):
  decode graphs  generation: the private pool of graph-captured decode steps (`runtime.decode`,
               `runtime.fast_decode`): one block's one-token step for the batch with every intermediate alive
               (`sizing.decode_step_bytes`) plus the quantized matmuls' scratch at `batch` tokens; where the head
               runs, its output and fp32 logits (`sizing.decode_head_bytes`); on the execution GPU, the step's
               static buffers (`sizing.decode_buffer_bytes`).
  recompute    training: the checkpointed block recomputed with gradients, then its backward: 2 x the one-block
               activation reserve (on the CPU in fp32 when blocks compute there).
  logits grad  training, where the head runs: the loss's fp32 log-softmax and the logits' fp32 gradient,
               2 x batch x seq_len x vocab x 4 (the logits themselves are in the activation reserve).
Streamed blocks keep the two stream slots in training: they are streamed again for the backward, never kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from shardq.planning.placement import PlanError, Training
from shardq.planning.runmode import covers
from shardq.quant import sizing

LORA_STATE_BYTES = 16  # fp32 parameter + fp32 gradient + AdamW's two fp32 moments
SLIDING_TYPES = ("sliding_attention", "chunked_attention", "hybrid_sliding", "reference_sliding_attention")


@dataclass(frozen=True)
class Carried:
    """What one block carries to the device that executes it, in elements (bytes depend on that device)."""

    kv: int = 0  # K and V elements of its attention layers' cache
    lora: int = 0  # LoRA parameters of its targeted linears
    saved: int = 0  # hidden-state elements checkpointed at its attention layers' inputs

    def nbytes(self, itemsize: int) -> dict[str, int]:
        """Bytes by reserve name on a device computing in `itemsize`; zero terms left out."""
        out = {"kv cache": self.kv * itemsize, "lora states": self.lora * LORA_STATE_BYTES}
        out["checkpoints"] = self.saved * itemsize
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class Extras:
    """The generation and training reserves of one plan, computed once (module docstring)."""

    kv_cache: bool = False
    training: Training | None = None
    carried: dict[str, Carried] = field(default_factory=dict)  # unit name -> what it carries
    step: int = 0  # decode graphs: per GPU executing blocks
    step_head: int = 0  # decode graphs: added where the head runs
    step_main: int = 0  # decode graphs: added on the execution GPU
    recompute: int = 0
    recompute_cpu: int = 0
    logits_grad: int = 0

    def carried_bytes(self, names: Iterable[str], itemsize: int) -> dict[str, int]:
        """The carried bytes of the units `names` on a device computing in `itemsize`, by reserve name."""
        out: dict[str, int] = {}
        for name in names:
            c = self.carried.get(name)
            if c is not None:
                out = add_bytes(out, c.nbytes(itemsize))
        return out

    def gpu(self, head: bool, main: bool) -> dict[str, int]:
        """Working reserves of a GPU executing blocks; `head`: the head runs there, `main`: the execution GPU."""
        out = {
            "decode graphs": self.step + (self.step_head if head else 0) + (self.step_main if main else 0),
            "recompute": self.recompute,
            "logits grad": self.logits_grad if head else 0,
        }
        return {k: v for k, v in out.items() if v}

    def cpu(self, head: bool) -> dict[str, int]:
        """Working reserves of the CPU when blocks compute there (no graphs: CPU steps run eagerly)."""
        out = {"recompute": self.recompute_cpu, "logits grad": self.logits_grad if head else 0}
        return {k: v for k, v in out.items() if v}

    def hint(self) -> str:
        """What to change when these reserves do not fit (for the planner's errors)."""
        out = ""
        if self.kv_cache:
            out += (
                " The reserve counts generate()'s KV cache and decode graphs for the workload (seq_len = prompt + "
                "new tokens): shrink the workload, or pass kv_cache=False to plan plain forwards."
            )
        if self.training is not None:
            out += (
                f" The reserve counts LoRA training (rank {self.training.rank}: adapters with gradients and AdamW "
                "states, checkpoints, recompute, logits gradient): shrink the workload or the rank."
            )
        return out


def add_bytes(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    """Two byte counts by name, added."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def check_training(training: Any) -> Training | None:
    """The `training` argument as a checked `Training` (True: rank 16 on all linears), or None (False/None)."""
    if training is None or training is False:
        return None
    if training is True:
        return Training()
    if not isinstance(training, Training):
        raise PlanError(
            f"training={training!r} must be True, False or shardq.planning.Training(rank=16, "
            "target_modules='all-linear')"
        )
    rank, targets = training.rank, training.target_modules
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PlanError(f"Training(rank={rank!r}): the LoRA rank must be an int >= 1, e.g. 16")
    if isinstance(targets, str):
        return training
    if not isinstance(targets, Sequence) or not targets or not all(isinstance(t, str) for t in targets):
        raise PlanError(
            f"Training(target_modules={targets!r}) must be 'all-linear', a regex, or a list of module names"
        )
    return Training(rank, tuple(targets))


def check_kv_cache(model: nn.Module, kv_cache: Any, training: Training | None) -> bool:
    """Whether the plan counts generation's KV cache: `kv_cache` as given, by default on for causal language
    models (transformers models that generate, not encoder-decoder) unless the plan is for training."""
    if kv_cache is not None and not isinstance(kv_cache, bool):
        raise PlanError(f"kv_cache={kv_cache!r} must be True, False or None (on for causal LMs)")
    cfg = getattr(model, "config", None)
    if kv_cache is None:
        return training is None and causal_lm(model)
    if kv_cache and (cfg is None or getattr(cfg, "is_encoder_decoder", False) or not attention_layers(model)):
        raise PlanError(
            f"kv_cache=True, but {type(model).__name__} is not a decoder-only transformers model with attention "
            "layers: the KV cache is sized for those only; pass kv_cache=False"
        )
    return kv_cache


def causal_lm(model: nn.Module) -> bool:
    """A transformers model that generates and is not encoder-decoder (its decoder's cache is the only cache)."""
    cfg = getattr(model, "config", None)
    can = getattr(model, "can_generate", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False) or not callable(can):
        return False
    return bool(can()) and bool(attention_layers(model))


def attention_layers(model: nn.Module) -> list[tuple[str, int]]:
    """(module name, layer index) of each attention module (class name ending in "Attention", outermost only);
    the index is its `layer_idx` when it has one, else its order."""
    found: list[tuple[str, int]] = []
    for name, m in model.named_modules():
        if not type(m).__name__.endswith("Attention") or any(covers(n, name) for n, _ in found):
            continue
        idx = getattr(m, "layer_idx", None)
        found.append((name, idx if isinstance(idx, int) and not isinstance(idx, bool) else len(found)))
    return found


def _first_int(cfg: Any, *names: str) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return 0


def kv_geometry(cfg: Any, dims: sizing.Dims) -> tuple[int, int]:
    """(kv_heads, head_dim) of a transformers config: KV heads from num_key_value_heads (num_kv_heads, n_head_kv;
    1 for multi-query attention), else the attention heads; head_dim from config.head_dim, else hidden / heads."""
    heads = dims.heads or 1
    kv = _first_int(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        kv = 1
    head_dim = _first_int(cfg, "head_dim") or dims.hidden // heads
    return kv or heads, head_dim


def cache_lengths(cfg: Any, layers: int, seq_len: int) -> list[int]:
    """Cache length of each layer for a context of `seq_len`, as `StaticCache` sizes it from the config's
    `layer_types` (else its sliding_window / attention_chunk_size): seq_len, capped at a sliding window or chunk;
    0 for layers without a KV cache (MoE/MLP-only, linear attention, convolutions)."""
    types = getattr(cfg, "layer_types", None)
    window = _first_int(cfg, "sliding_window") or _first_int(cfg, "attention_chunk_size")
    out = []
    for i in range(layers):
        kind = types[i] if isinstance(types, Sequence) and i < len(types) else None
        if kind is None:
            kind = "sliding_attention" if window else "full_attention"
        if kind in SLIDING_TYPES:
            out.append(min(seq_len, window) if window else seq_len)
        else:
            out.append(seq_len if kind == "full_attention" else 0)
    return out


def kv_elements(model: nn.Module, dims: sizing.Dims, batch: int, seq_len: int) -> dict[str, int]:
    """K and V elements of each attention module's cache for `batch` x `seq_len` (module docstring)."""
    cfg = getattr(model, "config", None)
    getter = getattr(cfg, "get_text_config", None)
    text = getter(decoder=True) if callable(getter) else cfg
    layers = attention_layers(model)
    kv_heads, head_dim = kv_geometry(text, dims)
    lengths = cache_lengths(text, max((i for _, i in layers), default=-1) + 1, seq_len)
    return {name: sizing.kv_cache_bytes(batch, lengths[i], kv_heads, head_dim, 1) for name, i in layers}


def lora_layers(model: nn.Module, training: Training) -> dict[str, int]:
    """LoRA parameters per targeted module, as PEFT creates them: "all-linear" = every nn.Linear / Conv1D but the
    output head (`get_output_embeddings()`); a string = a regex matching full names; a list = names matched as
    full names or name suffixes. Only linear layers are sized."""
    targets = training.target_modules
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) and targets == "all-linear" else None
    out = {}
    for name, m in model.named_modules():
        shape = sizing.linear_shape(m)
        if shape is None or m is head:
            continue
        if isinstance(targets, str):
            hit = targets == "all-linear" or re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            out[name] = sizing.lora_params(shape[0], shape[1], training.rank)
    return out


def owner(name: str, units: Sequence[str]) -> str | None:
    """The unit holding module `name`: the longest unit name covering it, else the first unit inside it (a module
    cut into its children)."""
    holding = [u for u in units if covers(u, name)]
    if holding:
        return max(holding, key=len)
    return next((u for u in units if name and covers(name, u)), None)


def carried_by_unit(
    model: nn.Module,
    units: Sequence[str],
    dims: sizing.Dims,
    workload: tuple[int, int],
    kv_cache: bool,
    training: Training | None,
) -> dict[str, Carried]:
    """What each unit carries to the device that executes it (module docstring)."""
    batch, seq_len = workload
    kv: dict[str, int] = {}
    lora: dict[str, int] = {}
    saved: dict[str, int] = {}

    def add(into: dict[str, int], module: str, n: int) -> None:
        u = owner(module, units)
        if u is not None:
            into[u] = into.get(u, 0) + n

    if kv_cache:
        for module, n in kv_elements(model, dims, batch, seq_len).items():
            add(kv, module, n)
    if training is not None:
        for module, n in lora_layers(model, training).items():
            add(lora, module, n)
        for module, _ in attention_layers(model):
            add(saved, module, batch * seq_len * dims.hidden)
    return {u: Carried(kv.get(u, 0), lora.get(u, 0), saved.get(u, 0)) for u in {*kv, *lora, *saved}}


def build_extras(
    model: nn.Module,
    units: Sequence[str],
    workload: tuple[int, int],
    itemsize: int,
    kv_cache: bool,
    training: Training | None,
    decode_workspace: int,
) -> Extras:
    """The plan's generation and training reserves (module docstring); `decode_workspace` is the quantized
    matmuls' scratch at `batch` tokens (`sizing.matmul_workspace_bytes`)."""
    if not kv_cache and training is None:
        return Extras()
    dims = sizing.model_dims(model)
    batch, seq_len = workload
    carried = carried_by_unit(model, units, dims, workload, kv_cache, training)
    ex = Extras(kv_cache=kv_cache, training=training, carried=carried)
    if kv_cache:
        ex = replace(
            ex,
            step=sizing.decode_step_bytes(dims, batch, seq_len, itemsize) + decode_workspace,
            step_head=sizing.decode_head_bytes(dims, batch, itemsize),
            step_main=sizing.decode_buffer_bytes(dims, batch, seq_len),
        )
    if training is not None:
        ex = replace(
            ex,
            recompute=2 * sizing.activation_bytes(dims, batch, seq_len, itemsize),
            recompute_cpu=2 * sizing.activation_bytes(dims, batch, seq_len, 4),
            logits_grad=2 * sizing.head_bytes(dims, batch, seq_len),
        )
    return ex
