"""Fast static decode loop: the whole token step (forward, sampling, writing the token, advancing positions) is one
CUDA graph, replayed back to back with no host sync per token (gpt-fast's loop).

transformers' `generate()` spends most of a small model's token in host code (input preparation, logits processors,
stopping criteria, a sync per token). `fast_generate` prefills eagerly into a `StaticCache`, then replays one graph
per signature (batch, dtype, cache length, sampling settings) whose static buffers hold the current token, its
positions, the 2-D attention mask (the prompt's mask, then ones), the output tokens and a device-side write index.
Every `SYNC_EVERY` tokens one sync checks whether every sequence has produced EOS; the result is trimmed exactly as
transformers trims it (pad after a sequence's EOS, stop when all are done).

Only models whose blocks are all resident on one device qualify (one graph holds the whole step); on the CPU the
same step runs eagerly (no capture), which is how CI tests it. `try_fast_generate` is the `generate()` hook of a
dispatched model: it takes requests `fast_support` accepts and leaves every other one to transformers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardq.hf import cache_kwarg
from shardq.runtime import graphs
from shardq.runtime.decode import decoder_of

SYNC_EVERY = 16
# Loops (static cache + graph per signature) kept for reuse by later generate() calls; older ones are freed.
MAX_LOOPS = 2
# generate() hook switch: on by default (GPU tests passed on an H100, 2026-12-07, transformers 5.17); False keeps
# transformers' loop with the per-step GraphDecoder.
ENABLED = True
# Dispatched models on the CPU keep transformers' loop in generate() (as GPU-less transformers does); tests set this
# to route CPU models through the fast loop too.
FAST_CPU = False
# torch.compile backend of fused steps (`set_graph_decode(model, fuse=True)`); CPU tests use "aot_eager".
FUSE_BACKEND = "inductor"
# Fused steps size the static cache in multiples of this many positions, so prompts of other lengths reuse the
# compiled step (positions past the current one are masked, as in any static cache longer than the text).
FUSE_BUCKET = 256

# GenerationConfig fields that add a logits processor or stopping rule the fast loop does not run: the values that
# leave them off (anything else falls back to transformers).
NEUTRAL: dict[str, tuple] = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "num_return_sequences": (None, 1),
    "penalty_alpha": (None,),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "sequence_bias": (None,),
    "min_length": (None, 0),
    "min_p": (None,),
    "top_h": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "diversity_penalty": (None, 0.0),
    "guidance_scale": (None, 1.0),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "return_dict_in_generate": (None, False),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "disable_compile": (None, False),
    "use_cache": (None, True),
    "prefill_chunk_size": (None,),
    "is_assistant": (None, False),
}
# generate() arguments beside the config: each must be None (or False) for the fast loop.
GENERATE_ARGS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "tokenizer",
    "assistant_tokenizer",
)
MODEL_KWARGS = {"attention_mask"}


def fast_support(config: Any, model_kwargs: dict[str, Any], generate_args: dict[str, Any] | None = None) -> str | None:
    """Why the fast loop cannot serve this resolved request (None: it serves it exactly).

    `config` is the GenerationConfig transformers would use (model defaults + call kwargs), `model_kwargs` what is
    left for the model's forward, `generate_args` the other `generate()` arguments."""
    if getattr(config, "cache_implementation", None) != "static":
        return "cache_implementation is not 'static'"
    for name, value in (generate_args or {}).items():
        if value not in (None, False, []):
            return f"{name} is not supported by the fast loop"
    for name, neutral in NEUTRAL.items():
        value = getattr(config, name, None)
        if not any(value is n or value == n for n in neutral):
            return f"{name}={value!r} is not supported by the fast loop"
    if getattr(config, "max_new_tokens", None) is None and getattr(config, "max_length", None) is None:
        return "no max_new_tokens or max_length"
    extra = sorted(k for k, v in model_kwargs.items() if k not in MODEL_KWARGS and v is not None)
    if extra:
        return f"model inputs {extra} are not supported by the fast loop"
    return None


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy, or sampled after temperature, top-k and top-p (transformers' order)."""

    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens are written (transformers' processor)


def choose(logits: torch.Tensor, s: Sampling, noise: torch.Tensor | None) -> torch.Tensor:
    """Next token of each row of fp32 `logits` (batch, vocab). Sampling draws argmax(probs / Exp(1) noise), a
    multinomial draw whose randomness is a static input (`noise`), so the step captures into a graph."""
    if not s.do_sample:
        return logits.argmax(-1)
    scores = logits
    if s.temperature is not None and s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        k = min(max(s.top_k, 1), scores.size(-1))
        kth = torch.topk(scores, k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - s.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if noise is None:
        raise ValueError("sampling needs a noise buffer")
    return (scores.softmax(-1) / noise).argmax(-1)


@dataclass
class Loop:
    """Static buffers of one signature: the cache and what one step reads and writes (all on the step's device)."""

    cache: Any
    ids: torch.Tensor  # (batch, 1) token fed to the next step
    pos: torch.Tensor  # (batch, 1) its position ids
    mask: torch.Tensor  # (batch, cache length) prompt mask, then ones
    out: torch.Tensor  # (batch, max_new_tokens) generated tokens
    idx: torch.Tensor  # (1,) where the next token is written
    done: torch.Tensor  # (batch,) sequences that produced EOS
    eos: torch.Tensor  # (n,) EOS ids
    pad: torch.Tensor  # () pad id
    noise: torch.Tensor | None  # (batch, vocab) Exp(1) draws when sampling
    graph: Any = None
    warm: bool = False


@dataclass
class FastState:
    """The fast loops of one model (one per signature) and counters saying which path each generate() took."""

    loops: OrderedDict[tuple, Loop] = field(default_factory=OrderedDict)  # most recently used last
    stats: dict[str, int] = field(
        default_factory=lambda: {"fast": 0, "fallback": 0, "captures": 0, "replays": 0, "eager_steps": 0}
    )
    last_fallback: str | None = None
    compiled: Any = None  # the model's torch.compile'd call for fused steps (made on the first fused step)


def fast_state(model: nn.Module) -> FastState:
    """The model's fast-loop state (made on first use)."""
    rt = _runtime(model)
    if rt.fast is None:
        rt.fast = FastState()
    state: FastState = rt.fast
    return state


def _runtime(model: nn.Module) -> Any:
    rt = model.__dict__.get("shardq_runtime")
    if rt is None:
        raise ValueError("fast_generate needs a model returned by shardq.dispatch_model or shardq.load_sharded")
    return rt


def step_device(model: nn.Module) -> torch.device | None:
    """The one device that runs every block (GPU-resident blocks on the main GPU, or CPU-run blocks of a CPU
    model); None when blocks are streamed, on disk or spread over devices (the step is then not one graph)."""
    rt = _runtime(model)
    main = rt.main_device
    mode = "gpu" if main.type == "cuda" else "cpu"
    if all(b.mode == mode and b.exec_device == main for b in rt.blocks.values()):
        return torch.device(main)
    return None


def _new_loop(
    model: nn.Module,
    batch: int,
    max_new: int,
    cache_len: int,
    s: Sampling,
    eos: list[int],
    pad: int,
    device: torch.device,
) -> Loop:
    """Allocate the static cache and step buffers of one signature."""
    from transformers import StaticCache

    def longs(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.long, device=device)

    vocab = model.get_output_embeddings().weight.shape[0]
    return Loop(
        cache=StaticCache(config=model.config, max_cache_len=cache_len),
        ids=longs(batch, 1),
        pos=longs(batch, 1),
        mask=longs(batch, cache_len),
        out=longs(batch, max_new),
        idx=longs(1),
        done=torch.zeros(batch, dtype=torch.bool, device=device),
        eos=torch.tensor(eos, dtype=torch.long, device=device),
        pad=torch.tensor(pad, dtype=torch.long, device=device),
        noise=torch.ones(batch, vocab, dtype=torch.float32, device=device) if s.do_sample else None,
    )


def _advance(loop: Loop, token: torch.Tensor) -> None:
    """Write the chosen tokens (pad for finished sequences) and move every position one on, all on the device."""
    token = torch.where(loop.done, loop.pad, token)
    loop.out.index_copy_(1, loop.idx, token[:, None])
    loop.done |= torch.isin(token, loop.eos)
    loop.ids.copy_(token[:, None])
    loop.pos.add_(1)
    loop.idx.add_(1)


def _step_forward(model: nn.Module, state: FastState) -> Any:
    """What runs a decode step's forward: the model, or its torch.compile'd call when steps are fused (one graph,
    static shapes: a new batch size or cache length recompiles once)."""
    if not _runtime(model).graph_fuse:
        return model
    if state.compiled is None:
        state.compiled = torch.compile(model, backend=FUSE_BACKEND, fullgraph=True, dynamic=False)
    return state.compiled


def _step(model: nn.Module, loop: Loop, s: Sampling, forward: Any) -> None:
    """One token: the forward transformers' loop would run (same input preparation and 4-D mask), then the choice
    and the writes. Everything reads and writes static buffers, so it is captured as it is."""
    inputs = model.prepare_inputs_for_generation(
        loop.ids,
        next_sequence_length=1,
        **{cache_kwarg(model): loop.cache},
        attention_mask=loop.mask,
        position_ids=loop.pos,
        use_cache=True,
    )
    logits = forward(**inputs, return_dict=True).logits[:, -1].float()
    _advance(loop, choose(_suppress_eos(logits, loop, s), s, loop.noise))


def _suppress_eos(logits: torch.Tensor, loop: Loop, s: Sampling) -> torch.Tensor:
    """EOS logits at -inf while fewer than `min_new_tokens` tokens are written (decided on the device)."""
    if s.min_new_tokens <= 0 or loop.eos.numel() == 0:
        return logits
    blocked = logits.index_fill(-1, loop.eos, float("-inf"))
    return torch.where(loop.idx < s.min_new_tokens, blocked, logits)


def _prefill(
    model: nn.Module, loop: Loop, ids: torch.Tensor, mask: torch.Tensor, s: Sampling, generator: torch.Generator | None
) -> None:
    """Run the prompt eagerly into the (reset) cache, choose the first token and set the step buffers."""
    loop.cache.reset()
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    kw: dict[str, Any] = {
        cache_kwarg(model): loop.cache,
        "attention_mask": mask,
        "position_ids": pos,
        "use_cache": True,
    }
    if model._supports_logits_to_keep():
        kw["logits_to_keep"] = 1
    inputs = model.prepare_inputs_for_generation(ids, is_first_iteration=True, **kw)
    logits = model(**inputs, return_dict=True).logits[:, -1].float()
    loop.mask.fill_(1)
    loop.mask[:, : mask.shape[1]].copy_(mask)
    loop.pos.copy_(pos[:, -1:])  # the prompt's last position: _advance moves it on to the first new token's
    loop.idx.zero_()
    loop.done.zero_()
    _draw_noise(loop, generator)
    _advance(loop, choose(_suppress_eos(logits, loop, s), s, loop.noise))


def _draw_noise(loop: Loop, generator: torch.Generator | None) -> None:
    """Fresh Exp(1) draws for the next sampled token (outside the graph: any generator, graph-safe)."""
    if loop.noise is not None:
        loop.noise.exponential_(generator=generator)


def _loop_for(state: FastState, key: tuple) -> Loop | None:
    """The kept loop of this signature (marked most recently used), if any."""
    loop = state.loops.get(key)
    if loop is not None:
        state.loops.move_to_end(key)
    return loop


def _keep(state: FastState, key: tuple, loop: Loop) -> Loop:
    """Keep `loop`, dropping the least recently used beyond MAX_LOOPS: each holds a static cache and a graph, so
    requests of ever new lengths must not pile them up on the GPU."""
    state.loops[key] = loop
    while len(state.loops) > MAX_LOOPS:
        state.loops.popitem(last=False)
    return loop


def _run_step(model: nn.Module, loop: Loop, s: Sampling, state: FastState, device: torch.device) -> None:
    """Eager on the CPU; on a GPU the first step of a signature is the warm-up (and the compile of fused steps),
    the second is captured (and replayed at once), later ones replay."""
    if loop.graph is not None:
        state.stats["replays"] += 1
        loop.graph.replay()
    elif device.type != "cuda" or not loop.warm:
        loop.warm = True
        state.stats["eager_steps"] += 1
        _step(model, loop, s, _step_forward(model, state))
    else:
        graph = graphs.new_graph(device, decoder_of(model).pools)
        graph.begin()
        _step(model, loop, s, _step_forward(model, state))
        graph.end()
        graph.replay()
        loop.graph = graph
        state.stats["captures"] += 1


def _decode(
    model: nn.Module, loop: Loop, s: Sampling, generator: torch.Generator | None, max_new: int, device: torch.device
) -> int:
    """Replay steps until `max_new` tokens are written or (checked every SYNC_EVERY tokens) all sequences are done;
    returns how many tokens were written."""
    state = fast_state(model)
    check = loop.eos.numel() > 0
    written = 1
    while written < max_new:
        if check and written % SYNC_EVERY == 0 and bool(loop.done.all()):
            break
        _draw_noise(loop, generator)
        _run_step(model, loop, s, state, device)
        written += 1
    return written


def _trim(loop: Loop, written: int) -> torch.Tensor:
    """The tokens transformers would return: up to the step where the last sequence produced EOS."""
    out = loop.out[:, :written]
    if loop.eos.numel() == 0:
        return out
    is_eos = torch.isin(out, loop.eos)
    if not bool(is_eos.any(-1).all()):
        return out
    last = int(is_eos.int().argmax(-1).max()) + 1
    return out[:, :last]


def _eos_list(eos_token_id: int | list[int] | torch.Tensor | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(t) for t in eos_token_id.flatten().tolist()]
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def fast_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float | None = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | torch.Tensor | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Prompt plus generated tokens, as `generate()` returns them, from the static graph loop (module docstring).

    Raises ValueError when the model's blocks are not all resident on one device (callers then use transformers)."""
    device = step_device(model)
    if device is None:
        raise ValueError(
            "fast_generate needs every block resident on one device (streamed, disk or multi-device "
            "models decode through model.generate)"
        )
    if max_new_tokens < 1 or input_ids.dim() != 2:
        raise ValueError("fast_generate needs 2-D input_ids and max_new_tokens >= 1")
    eos = _eos_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    s = Sampling(
        do_sample,
        temperature if do_sample else None,
        top_k if do_sample else None,
        top_p if do_sample else None,
        min_new_tokens,
    )
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    batch, prompt = ids.shape
    cache_len = prompt + max_new_tokens - 1  # as transformers sizes it: the last token never enters the cache
    if _runtime(model).graph_fuse:
        cache_len = -(-cache_len // FUSE_BUCKET) * FUSE_BUCKET
    key = (batch, cache_len, max_new_tokens, _runtime(model).model_dtype, device, s, tuple(eos), pad)
    state = fast_state(model)
    loop = _loop_for(state, key)
    if loop is None:
        loop = _keep(state, key, _new_loop(model, batch, max_new_tokens, cache_len, s, eos, pad, device))
    state.stats["fast"] += 1
    with torch.no_grad():
        _prefill(model, loop, ids, mask, s, generator)
        written = _decode(model, loop, s, generator, max_new_tokens, device)
        new = _trim(loop, written)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=-1)


def _resolve(
    model: nn.Module, inputs: torch.Tensor | None, generation_config: Any, kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any], dict[str, Any], torch.Tensor | None]:
    """The request as transformers resolves it: (GenerationConfig, model kwargs, other generate() args, input ids)."""
    kwargs = dict(kwargs)
    generate_args = {k: kwargs.pop(k) for k in GENERATE_ARGS if k in kwargs}
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    return config, model_kwargs, generate_args, ids


def _reason(model: nn.Module, config: Any, model_kwargs: dict, generate_args: dict, ids: Any) -> str | None:
    """Why this resolved request goes to transformers (None: the fast loop serves it)."""
    reason = fast_support(config, model_kwargs, generate_args)
    if reason is not None:
        return reason
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        return "input_ids are not a 2-D LongTensor"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models decode through transformers' loop"
    device = step_device(model)
    if device is None:
        return "blocks are not all resident on one device"
    if device.type != "cuda" and not FAST_CPU:
        return "the model runs on the CPU"
    if config.max_new_tokens is None and config.max_length - ids.shape[1] < 1:
        return "max_length leaves no new tokens"
    return None


def try_fast_generate(
    model: nn.Module, inputs: torch.Tensor | None, generation_config: Any, kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """The `generate()` hook of a dispatched model: the fast loop's result when graph decode is on and the request
    is one it serves exactly; None to let transformers' generate() run (counted in `fast_state(model).stats`)."""
    rt = model.__dict__.get("shardq_runtime")
    if rt is None or not rt.graph_decode or not ENABLED:
        return None
    config, model_kwargs, generate_args, ids = _resolve(model, inputs, generation_config, kwargs)
    reason = _reason(model, config, model_kwargs, generate_args, ids)
    state = fast_state(model)
    if reason is not None:
        state.stats["fallback"] += 1
        state.last_fallback = reason
        return None
    assert isinstance(ids, torch.Tensor)
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - ids.shape[1]
    return fast_generate(
        model,
        ids,
        model_kwargs.get("attention_mask"),
        max_new_tokens=max_new,
        do_sample=bool(config.do_sample),
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        min_new_tokens=config.min_new_tokens or 0,
    )
