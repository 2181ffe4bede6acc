"""Exact bytes of every tensor as stored for a `QuantConfig`, and the activation estimate of a workload.

Formulas (DESIGN.md "Stored formats"), for a quantized weight of `numel = out*in` elements:
  int8:  numel + 4*out                               (int8 codes + fp32 SCB per output row)
  4-bit: ceil(numel/2) + 4*nblocks + 64              (packed nibbles + fp32 absmax + fp32 quant_map[16])
         double quant: nblocks + 4*ceil(nblocks/256) + 1024 + 4 replaces 4*nblocks
         (uint8 absmax codes + fp32 nested absmax + fp32 nested map[256] + fp32 offset)
with nblocks = ceil(numel/blocksize). Quantized: the `weight` of every layer `quantized_layers` names (an
`nn.Linear` or subclass, or transformers' GPT-2 `Conv1D`, as bitsandbytes converts them; never MultiheadAttention's
out_proj) whose name the config does not skip and which is not tied to another parameter (a tied head shares the
embedding's full-precision tensor, as bitsandbytes keeps it). Everything else keeps its own dtype; modules computed
on the CPU in fp32 (fp32 CPU offload, or no GPU) hold every floating tensor in fp32 and nothing quantized, except
that on a machine without a GPU quantized weights stay packed (the planner's `_cpu_quantized`).
Fused MoE expert stacks (`fused_expert_params`: 3-D [E, out, in] parameters of transformers' experts modules) are
quantized too, each expert exactly as a linear [out, in] weight: E x the formula above (`quantized_experts`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from shardq.config import NESTED_BLOCKSIZE, QuantConfig

QUANT_MAP_BYTES = 16 * 4
NESTED_MAP_BYTES = 256 * 4
OFFSET_BYTES = 4


@dataclass(frozen=True)
class TensorEntry:
    """One parameter or buffer: `key` identifies the tensor object (tied names share it)."""

    name: str
    key: int
    numel: int
    dtype: torch.dtype
    quantized: bool
    stored: int  # bytes on a GPU, streamed from the CPU, or on disk in the stored (maybe quantized) format
    fp32: int  # bytes when kept unquantized in fp32 on the CPU

    @property
    def source_bytes(self) -> int:
        """Bytes of the tensor in its own dtype, as read from the checkpoint."""
        return self.numel * self.dtype.itemsize


def quantized_weight_bytes(out_features: int, in_features: int, quant: QuantConfig) -> int:
    """Bytes of one linear weight `[out, in]` as stored by `quant` (DESIGN.md formulas)."""
    numel = out_features * in_features
    if quant.method == "int8":
        return numel + 4 * out_features
    if quant.is_4bit:
        nblocks = math.ceil(numel / quant.blocksize)
        if quant.double_quant:
            stats = nblocks + 4 * math.ceil(nblocks / NESTED_BLOCKSIZE) + NESTED_MAP_BYTES + OFFSET_BYTES
        else:
            stats = 4 * nblocks
        return math.ceil(numel / 2) + stats + QUANT_MAP_BYTES
    raise ValueError(f"quantization method {quant.method!r} stores no quantized weights")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 and kin) or a subclass: a linear layer whose weight is stored [in, out] (nx, nf)
    and computed as `x @ W + b`. Told by class name and layout, so transformers is never imported here."""
    if not any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__):
        return False
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return False
    nf, nx = getattr(module, "nf", w.shape[1]), getattr(module, "nx", w.shape[0])
    return tuple(w.shape) == (nx, nf)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of an nn.Linear or transformers Conv1D (weight stored [in, out]); else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        w = module.weight
        return int(w.shape[1]), int(w.shape[0])
    return None


def quantizable(module: nn.Module) -> bool:
    """True for a layer type the quantizer replaces, as bitsandbytes does: `nn.Linear` and its subclasses, and
    transformers' `Conv1D`. Not MultiheadAttention's out_proj (`NonDynamicallyQuantizableLinear`): the attention
    reads its `.weight` directly instead of calling it."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    return isinstance(module, nn.Linear) or is_conv1d(module)


def quantized_layers(
    model: nn.Module, quant: QuantConfig, skip: tuple[str, ...] | list[str] = ()
) -> dict[str, nn.Module]:
    """Name -> module of every layer stored quantized under `quant`: `quantizable`, not skipped by the config
    or by `skip` (same matching rules), and with a weight no other parameter name shares (a tied head keeps the
    embedding's full-precision tensor). Empty for method "none". The one rule sizing, planner, loader and
    `quantize_model` follow."""
    if quant.method == "none":
        return {}
    extra = QuantConfig(skip_modules=tuple(skip)) if skip else None
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not quantizable(module) or quant.skips(name) or (extra is not None and extra.skips(name)):
            continue
        w = module._parameters.get("weight")
        if w is not None and counts[id(w)] == 1:
            out[name] = module
    return out


def fused_expert_params(module: nn.Module) -> list[str]:
    """Names of a module's fused expert stacks that shardq quantizes: the 3-D floating parameters [E, out, in] of a
    module transformers' `@use_experts_implementation` built (it sets `is_transposed` and `has_gate`), in the
    non-transposed layout whose eager forward computes `F.linear(x, stack[e])`. Transposed stacks ([E, in, out],
    e.g. GPT-OSS) stay float. Told by attributes, so transformers is never imported here."""
    if not (hasattr(module, "has_gate") and getattr(module, "is_transposed", None) is False):
        return []
    experts = getattr(module, "num_experts", None)
    return [
        n
        for n, p in module._parameters.items()
        if p is not None and p.dim() == 3 and p.is_floating_point() and (experts is None or p.shape[0] == experts)
    ]


def quantized_experts(
    model: nn.Module, quant: QuantConfig, skip: tuple[str, ...] | list[str] = ()
) -> dict[str, tuple[int, int, int]]:
    """Full parameter name -> (experts, out, in) of every fused expert stack stored quantized under `quant`:
    `fused_expert_params`, neither the experts module nor the parameter skipped by the config or `skip` (the
    rules of `quantized_layers`), and not shared with another name. Empty for method "none"."""
    if quant.method == "none":
        return {}
    extra = QuantConfig(skip_modules=tuple(skip)) if skip else None
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out: dict[str, tuple[int, int, int]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr in fused_expert_params(module):
            full = f"{mod_name}.{attr}" if mod_name else attr
            skipped = any(c.skips(n) for c in (quant, extra) if c is not None for n in (mod_name, full))
            p = module._parameters[attr]
            if not skipped and counts[id(p)] == 1:
                out[full] = (int(p.shape[0]), int(p.shape[1]), int(p.shape[2]))
    return out


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a quantizable layer as [out, in] (a Conv1D's [in, out] transposed, contiguous), detached."""
    w = module.weight.detach()
    return w.t().contiguous() if is_conv1d(module) else w


def tensor_entries(model: nn.Module, quant: QuantConfig) -> dict[str, TensorEntry]:
    """Every parameter and buffer by full name (tied names included), sized for `quant`."""
    layers = quantized_layers(model, quant)
    stacks = quantized_experts(model, quant)
    out: dict[str, TensorEntry] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        shape = linear_shape(module) if mod_name in layers else None
        for kind, tensors in (("p", module._parameters), ("b", module._buffers)):
            for tname, t in tensors.items():
                if t is None:
                    continue
                full = f"{mod_name}.{tname}" if mod_name else tname
                q = shape is not None and kind == "p" and tname == "weight"
                own = t.numel() * t.dtype.itemsize
                fp32 = t.numel() * 4 if t.is_floating_point() else own
                stored = quantized_weight_bytes(shape[0], shape[1], quant) if q and shape is not None else own
                if kind == "p" and full in stacks:
                    experts, out_f, in_f = stacks[full]
                    q, stored = True, experts * quantized_weight_bytes(out_f, in_f, quant)
                out[full] = TensorEntry(full, id(t), t.numel(), t.dtype, q, stored, fp32)
    return out


def unique_bytes(entries: list[TensorEntry], fp32: bool = False) -> int:
    """Bytes of `entries` with each tensor counted once (tied names share one tensor)."""
    seen: dict[int, int] = {}
    for e in entries:
        seen[e.key] = e.fp32 if fp32 else e.stored
    return sum(seen.values())


@dataclass(frozen=True)
class Dims:
    """Widths of a transformer that set its activation memory."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int


def model_dims(model: nn.Module) -> Dims:
    """Hidden, MLP, head and vocab sizes from a transformers config, else guessed from the Linear layers."""
    cfg = getattr(model, "config", None)

    def first(*names: str) -> int:
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return 0

    shapes = [s for m in model.modules() if (s := linear_shape(m)) is not None]
    ins = Counter(i for _, i in shapes)
    hidden = first("hidden_size", "d_model", "n_embd", "dim") or (ins.most_common(1)[0][0] if ins else 0)
    vocab = first("vocab_size")
    widths = [o for o, _ in shapes if o != vocab]
    inter = first("intermediate_size", "ffn_dim", "d_ff", "n_inner", "decoder_ffn_dim") or max(
        widths, default=4 * hidden
    )
    heads = first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    return Dims(hidden, inter, heads, vocab)


def activation_bytes(dims: Dims, batch: int, seq_len: int, itemsize: int) -> int:
    """Peak activations of one block's forward for `batch` x `seq_len` tokens (inference, no grad).

    Hidden states in and out, q/k/v and the attention output (6 x hidden), the MLP's up/gate outputs
    (2 x intermediate), and eager attention's scores and probabilities (2 x heads x seq_len^2).
    """
    tokens = batch * seq_len
    per_token = 6 * dims.hidden + 2 * dims.intermediate
    scores = 2 * batch * dims.heads * seq_len * seq_len
    return (tokens * per_token + scores) * itemsize


def matmul_workspace_bytes(shapes: list[tuple[int, int]], quant: QuantConfig, tokens: int, itemsize: int) -> int:
    """Scratch the CUDA quantized matmuls allocate for one call, at most over the `(out, in)` weight shapes.

    int8 (LLM.int8()): the int8 activations and per-column statistics, the int32 product of the tensor-core GEMM,
    x's compacted outlier columns, and zero-padded copies when a dimension is not a multiple of 8. 4-bit with more
    than SMALL_M rows (F32_MAX_M for fp32 activations), or a layout the small-M kernels refuse (K % 32 != 0,
    blocksize < 32): the weight rows dequantized per cuBLAS call (whole weight, at most DEQUANT_CHUNK_BYTES), or
    for the Hopper kernel's K split (SMALL_M < M <= WGMMA_MAX_M) its fp32 partial sums, whichever is larger; the
    small-M kernels need none, except the GEMV's K split (M <= GEMV_MAX_M, x too large to stage whole): fp32 sums, 4
    bytes per token and output feature, and the ring kernel's K in parts (M > 8, narrow N): 4 bytes per part, token
    and output feature.
    """
    from shardq.kernels import cuda_ops
    from shardq.kernels.cuda_ops import DEQUANT_CHUNK_BYTES, GEMV_MAX_M, INT8_PREP_STATS, SMALL_M, int8_outlier_cap

    def int8(n: int, k: int) -> int:
        pad = (tokens * _up8(k) + _up8(n) * _up8(k)) if (n % 8 or k % 8) else 0
        outliers = tokens * int8_outlier_cap(tokens, k, quant.threshold) * itemsize
        return 8 * k + 4 * INT8_PREP_STATS + tokens * (k + 4) + 4 * tokens * _up8(n) + pad + outliers + 1536

    def four(n: int, k: int) -> int:
        if tokens <= SMALL_M and k % 32 == 0 and itemsize == 2 and quant.blocksize >= 32:
            gemv_split = tokens <= GEMV_MAX_M and k % 256 == 0 and k >= 2048  # the GEMV's K split: fp32 sums
            # the ring kernel's K in parts where its row tiles are fewer than the SMs (at most ~160 on any GPU) and
            # the GEMV does not take the shape (M > GEMV_MAX_M, or K too small or x too large for it)
            gemv_takes = tokens <= GEMV_MAX_M and 1024 <= k <= 8192
            tc_split = tokens > 8 and not gemv_takes and k % 128 == 0 and n < 160 * (64 if tokens <= 16 else 128)
            return max(4 * tokens * n if gemv_split else 0, 4 * cuda_ops.TC_SPLIT_PARTS * tokens * n if tc_split else 0)
        fp32_kernel = cuda_ops.GEMM4_F32 and tokens <= cuda_ops.F32_MAX_M and k * 4 + 64 <= cuda_ops.F32_MIN_SMEM
        if itemsize == 4 and k % 32 == 0 and quant.blocksize >= 32 and fp32_kernel:
            return 0
        rows = max(1, min(n, DEQUANT_CHUNK_BYTES // (k * itemsize)))
        partials = 4 * cuda_ops.WGMMA_MAX_SPLITS * tokens * n if SMALL_M < tokens <= cuda_ops.WGMMA_MAX_M else 0
        return max(rows * k * itemsize, partials)

    if quant.method == "int8":
        return max((int8(n, k) for n, k in shapes), default=0)
    if quant.is_4bit:
        return max((four(n, k) for n, k in shapes), default=0)
    return 0


def _up8(v: int) -> int:
    return -(-v // 8) * 8


def head_bytes(dims: Dims, batch: int, seq_len: int) -> int:
    """The output head's logits, which transformers returns in fp32: batch x seq_len x vocab x 4."""
    return batch * seq_len * dims.vocab * 4


def kv_cache_bytes(batch: int, cache_len: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K and V of one attention layer's cache, as transformers' `StaticCache` preallocates them (a dynamic cache
    grows to the same): 2 x batch x cache_len x kv_heads x head_dim x itemsize."""
    return 2 * batch * cache_len * kv_heads * head_dim * itemsize


def decode_step_bytes(dims: Dims, batch: int, cache_len: int, itemsize: int) -> int:
    """Intermediates of one block's one-token step for `batch` rows, all kept alive, as a CUDA graph's private pool
    may hold them: per row 12 x hidden (block input, norms, q/k/v, rotated q/k, attention and projection outputs,
    residuals) + 4 x intermediate (gate, up, their product, the activation) in the compute dtype, and the attention
    scores, probabilities and mask over the whole cache in fp32 (2 x heads x cache_len + cache_len, 4 bytes)."""
    per_row = (12 * dims.hidden + 4 * dims.intermediate) * itemsize + (2 * dims.heads + 1) * cache_len * 4
    return batch * per_row


def decode_head_bytes(dims: Dims, batch: int, itemsize: int) -> int:
    """The head's output of a one-token step and its fp32 copy (the logits transformers returns): batch x vocab x
    (itemsize + 4)."""
    return batch * dims.vocab * (itemsize + 4)


def decode_buffer_bytes(dims: Dims, batch: int, cache_len: int) -> int:
    """Static inputs and outputs of a captured token step (`runtime.fast_decode`): int64 attention mask and token
    buffer of cache_len per row, ids, positions and flags (4 x int64 per row), and the fp32 sampling noise (vocab
    per row)."""
    return batch * (8 * (2 * cache_len + 4) + 4 * dims.vocab)


def lora_params(out_features: int, in_features: int, rank: int) -> int:
    """Parameters of one LoRA adapter on a linear [out, in]: A is [rank, in], B is [out, rank]."""
    return rank * (in_features + out_features)
