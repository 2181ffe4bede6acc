"""Fused MoE expert stacks stored quantized, one expert at a time.

transformers 5 keeps a MoE layer's experts as 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])
and its eager forward computes `F.linear(x, self.gate_up_proj[e])` for each expert hit. `QuantizedExperts`
replaces such a parameter: it holds the E weights in shardq's formats, each expert exactly as a `Linear4bit`
(NF4/FP4, optional double quant) or `Linear8bit` (row-wise int8 + SCB) of that [out, in] weight would, and
`stack[e]` returns expert e dequantized to the stored dtype, so the experts module's own forward runs unchanged.

int8 here is weight-only: the weight is dequantized and multiplied in the compute dtype. It is not LLM.int8()
(no int8 activations, no outlier columns), as the eager forward calls `F.linear` on the indexed weight.

transformers' grouped and batched experts kernels (`grouped_mm`, `batched_mm`, ...) read the whole 3-D tensor or
gather it with index tensors; a quantized experts module is switched to shardq's own experts implementation
(`IMPLEMENTATION`, registered in transformers' `ALL_EXPERTS_FUNCTIONS`). With both stacks 4-bit and the input on a
GPU it runs `grouped_experts_forward`: tokens sorted by expert once, gate_up and down each one
`shardq::grouped_gemm_4bit` (one kernel launch for all experts, weights dequantized in registers, experts without
tokens never read). Elsewhere (CPU, int8 stacks, gradients, layouts it does not cover) it runs the module's own eager
loop, which dequantizes each expert a batch uses whole (`stack[e]`): the CPU path and the oracle.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

import shardq.kernels.ops  # registers torch.ops.shardq
from shardq.config import NESTED_BLOCKSIZE, QuantConfig
from shardq.formats import blockwise, codebooks
from shardq.quant.linear import _Quantized


class QuantizedExperts(_Quantized):
    """E quantized [out, in] weights; `self[e]` is expert e's weight dequantized (the eager experts forward's
    `self.gate_up_proj[expert_idx]`). Buffers (leading dim E, per expert as the matching linear layer stores them):
    4-bit: weight uint8 [E, ceil(n/2)], absmax [E, nblocks] (fp32, or uint8 with double quant), quant_map [E, 16],
    double quant: nested_absmax [E, ceil(nblocks/256)], nested_quant_map [E, 256], nested_offset [E];
    int8: weight int8 [E, out, in], SCB fp32 [E, out]."""

    bias = None  # a stack has none; expert biases stay float parameters of the experts module

    def __init__(
        self,
        num_experts: int,
        out_features: int,
        in_features: int,
        cfg: QuantConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if cfg.method not in ("int8", "nf4", "fp4"):
            raise ValueError(f"QuantizedExperts needs method int8, nf4 or fp4, got {cfg.method!r}")
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.method, self.blocksize, self.double_quant = cfg.method, cfg.blocksize, cfg.is_4bit and cfg.double_quant
        self.dtype = dtype
        self._offsets: list[float] | None = None
        e, numel = num_experts, out_features * in_features
        if cfg.method == "int8":
            self.register_buffer("weight", torch.empty(e, out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("SCB", torch.empty(e, out_features, dtype=torch.float32, device=device))
            return
        nb = blockwise.n_blocks(numel, cfg.blocksize)
        self.register_buffer("weight", torch.empty(e, (numel + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "absmax", torch.empty(e, nb, device=device, dtype=torch.uint8 if self.double_quant else torch.float32)
        )
        self.register_buffer("quant_map", torch.empty(e, 16, dtype=torch.float32, device=device))
        if self.double_quant:
            self.register_buffer("nested_absmax", torch.empty(e, -(-nb // NESTED_BLOCKSIZE), device=device))
            self.register_buffer("nested_quant_map", torch.empty(e, 256, dtype=torch.float32, device=device))
            self.register_buffer("nested_offset", torch.empty(e, dtype=torch.float32, device=device))

    @property
    def shape(self) -> torch.Size:
        """[E, out, in], the shape of the float stack this replaces."""
        return torch.Size((self.num_experts, self.out_features, self.in_features))

    def __len__(self) -> int:
        return self.num_experts

    def load_from_float(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedExperts:
        """Quantize a float [E, out, in] stack on its own device, expert by expert; returns self."""
        if bias is not None:
            raise ValueError("an expert stack has no bias: expert biases stay float parameters of the experts module")
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"expert stack has shape {tuple(weight.shape)}, expected {tuple(self.shape)} (E, out, in)")
        if not weight.is_floating_point() or weight.device.type == "meta":
            raise ValueError(f"expert stack is {weight.dtype} on {weight.device}: give real float values to quantize")
        self.dtype = weight.dtype
        if self.method == "int8":
            q, scb = torch.ops.shardq.quantize_int8_rowwise(weight.reshape(-1, self.in_features).contiguous())
            self.set_quantized({"weight": q.view(self.shape), "SCB": scb.view(self.num_experts, self.out_features)})
            return self
        parts = [
            _quantize_4bit(weight[e].contiguous(), self.method, self.blocksize, self.double_quant)
            for e in range(self.num_experts)
        ]
        self.set_quantized({k: torch.stack([p[k] for p in parts]) for k in parts[0]})
        return self

    def set_quantized(self, state: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        super().set_quantized(state, bias)
        self._offsets = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._offsets = None

    def _offset(self, e: int) -> float:
        """Expert e's double-quant offset as a Python float (cached: one device sync per stack, not per call)."""
        if self._offsets is None:
            self._offsets = self.nested_offset.tolist()
        return self._offsets[e]

    def expert(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e's [out, in] weight dequantized to `dtype` (default: the dtype it was quantized from)."""
        dtype = dtype or self.dtype
        if self.method == "int8":
            return (self.weight[e].float() * (self.SCB[e] / 127.0).unsqueeze(1)).to(dtype)
        absmax = self.absmax[e]
        if self.double_quant:
            absmax = blockwise.dequantize_absmax(
                absmax, self.nested_absmax[e], self.nested_quant_map[e], self._offset(e)
            )
        return shardq.kernels.ops.call(
            "dequantize_4bit",
            self.weight[e].unsqueeze(1),
            absmax,
            self.quant_map[e],
            self.blocksize,
            [self.out_features, self.in_features],
            dtype,
        )

    def __getitem__(self, idx: int | torch.Tensor) -> torch.Tensor:
        if isinstance(idx, torch.Tensor) and idx.numel() == 1 and not idx.is_floating_point():
            idx = int(idx)
        if not isinstance(idx, int):
            raise TypeError(
                f"a quantized expert stack is indexed by one expert (int or 1-element tensor), got "
                f"{type(idx).__name__}: run the experts module with experts_implementation='eager'"
            )
        if not -self.num_experts <= idx < self.num_experts:
            raise IndexError(f"expert {idx} out of range for {self.num_experts} experts")
        return self.expert(idx % self.num_experts)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole [E, out, in] stack dequantized."""
        return torch.stack([self.expert(e, dtype) for e in range(self.num_experts)])

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}, "
            f"method={self.method}, blocksize={self.blocksize}, double_quant={self.double_quant}"
        )


def _quantize_4bit(w: torch.Tensor, method: str, blocksize: int, double_quant: bool) -> dict[str, torch.Tensor]:
    """One [out, in] weight as `Linear4bit.load_from_float` stores it (packed flattened to 1-D)."""
    code = codebooks.code_4bit(method, w.device)
    packed, absmax = torch.ops.shardq.quantize_4bit(w, code, blocksize)
    state = {"weight": packed.reshape(-1), "quant_map": code}
    if not double_quant:
        return state | {"absmax": absmax}
    nested = blockwise.quantize_absmax(absmax, codebooks.dynamic_map(w.device))
    return state | {
        "absmax": nested.q,
        "nested_absmax": nested.nested_absmax,
        "nested_quant_map": nested.code,
        "nested_offset": nested.offset.reshape(()),
    }


# Experts implementations shardq registers with transformers: IMPLEMENTATION runs the grouped forward where the
# input is on a GPU and the stacks are 4-bit (else the eager loop); GROUPED runs it on every device (the CPU runs
# the reference op: tests compare it with the eager loop).
IMPLEMENTATION = "shardq"
GROUPED = "shardq_grouped"
# Off by default until its GPU tests have run (csrc/grouped_gemm_4bit.cu was written and compiled without a GPU,
# 2026-12-08): SHARDQ_GROUPED_EXPERTS=1 routes 4-bit stacks on the GPU through the grouped kernel.
GROUPED_EXPERTS = os.environ.get("SHARDQ_GROUPED_EXPERTS", "0") == "1"


def set_implementation(experts: nn.Module, name: str) -> None:
    """Make a transformers experts module run implementation `name` whatever the model's `experts_implementation`:
    it reads `self.config._experts_implementation` at each forward, so it gets its own shallow config copy set to
    `name` (the model's config, shared by every other module, is left alone)."""
    cfg = getattr(experts, "config", None)
    if cfg is None or getattr(cfg, "_experts_implementation", None) == name:
        return
    if name in (IMPLEMENTATION, GROUPED):
        register_implementations()
    own = copy.copy(cfg)
    own._experts_implementation_internal = name  # the property setter would also rewrite shared sub-configs
    experts.config = own


def force_eager(experts: nn.Module) -> None:
    """Make a transformers experts module run its own eager loop."""
    set_implementation(experts, "eager")


def replace_stack(experts: nn.Module, attr: str, new: nn.Module) -> nn.Parameter:
    """Put `new` where the experts module held parameter `attr`; returns the parameter taken out. The module then
    runs shardq's experts implementation (grouped 4-bit matmuls on the GPU, else its eager loop)."""
    old = experts._parameters.pop(attr)
    experts._modules[attr] = new
    set_implementation(experts, IMPLEMENTATION)
    return old


def register_implementations() -> None:
    """Register shardq's experts forwards in transformers' `ALL_EXPERTS_FUNCTIONS` (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION] = shardq_experts_forward
    ALL_EXPERTS_FUNCTIONS[GROUPED] = grouped_experts_forward


def _eager_forward(experts: nn.Module) -> Callable:
    """The experts class's own forward (the eager loop) under transformers' dispatching wrapper."""
    fn = type(experts).forward
    return getattr(fn, "__wrapped__", fn)


def grouped_supported(experts: nn.Module, hidden_states: Tensor) -> bool:
    """Whether `grouped_experts_forward` computes this module's forward: both stacks 4-bit `QuantizedExperts` of
    matching sizes, the gated [gate; up] layout without biases, post norm or expert parallelism, 2-D input of the
    stacks' dtype family, no gradient wanted (the grouped op has no backward)."""
    gate_up, down = experts._modules.get("gate_up_proj"), experts._modules.get("down_proj")
    if not (isinstance(gate_up, QuantizedExperts) and isinstance(down, QuantizedExperts)):
        return False
    return (
        gate_up.method != "int8"
        and down.method != "int8"
        and getattr(experts, "has_gate", False)
        and not getattr(experts, "has_bias", False)
        and not getattr(experts, "is_transposed", False)
        and not getattr(experts, "has_post_expert_norm", False)
        and not getattr(experts, "_is_expert_parallel", False)
        and hidden_states.dim() == 2
        and gate_up.in_features == hidden_states.shape[-1] == down.out_features
        and gate_up.out_features == 2 * down.in_features
        and not (hidden_states.requires_grad and torch.is_grad_enabled())
    )


def shardq_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """shardq's experts implementation: the grouped 4-bit forward for GPU inputs it supports, else the eager loop."""
    if GROUPED_EXPERTS and hidden_states.is_cuda and grouped_supported(self, hidden_states):
        return grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)


def grouped_matmul(stack: QuantizedExperts, x: Tensor, offsets: Tensor) -> Tensor:
    """Rows offsets[e]:offsets[e + 1] of x through expert e of a 4-bit stack: one `shardq::grouped_gemm_4bit`."""
    nested = (stack.nested_absmax, stack.nested_quant_map, stack.nested_offset) if stack.double_quant else (None,) * 3
    return shardq.kernels.ops.call(
        "grouped_gemm_4bit", x, offsets, stack.weight, stack.absmax, stack.quant_map, stack.blocksize,
        stack.out_features, *nested,
    )  # fmt: skip


def grouped_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The eager loop's result with two grouped matmuls: the (token, slot) pairs sorted by expert once (stable:
    each expert's rows in token order, as the loop gathers them), offsets by binary search (no host sync, so CUDA
    graphs can capture it), gate_up, the gate, down, the routing weights, then the rows added back per token in
    expert order (index_add_, as the loop does). Falls back to the eager loop where `grouped_supported` says no."""
    if not grouped_supported(self, hidden_states):
        return _eager_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    num_experts, top_k = len(self.gate_up_proj), top_k_index.shape[-1]
    with torch.no_grad():
        expert_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)
        bounds = torch.arange(num_experts + 1, device=expert_ids.device, dtype=expert_ids.dtype)
        offsets = torch.searchsorted(expert_ids, bounds)
    token_idx = perm // top_k
    h = grouped_matmul(self.gate_up_proj, hidden_states[token_idx], offsets)
    h = self._apply_gate(h)
    h = grouped_matmul(self.down_proj, h, offsets)
    h = h * top_k_weights.reshape(-1)[perm, None]
    out = torch.zeros_like(hidden_states)
    return out.index_add_(0, token_idx, h.to(out.dtype))


def quantize_stacks(model: nn.Module, stacks: dict[str, tuple[int, int, int]], cfg: QuantConfig) -> None:
    """Quantize in place each named fused expert stack (as `shardq.quant.sizing.quantized_experts` names them) on the
    device it is on."""
    for full in stacks:
        parent, _, attr = full.rpartition(".")
        experts = model.get_submodule(parent)
        w = experts._parameters[attr].detach()
        num_experts, out_features, in_features = w.shape
        new = QuantizedExperts(num_experts, out_features, in_features, cfg, device="meta", dtype=w.dtype)
        new = new.load_from_float(w)
        replace_stack(experts, attr, new)


def dequantize_stacks(model: nn.Module) -> None:
    """Put every quantized expert stack back as a float 3-D parameter of its dequantized values (the experts
    module keeps running the eager loop)."""
    for name, q in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedExperts)]:
        parent, _, attr = name.rpartition(".")
        experts = model.get_submodule(parent)
        del experts._modules[attr]
        experts._parameters[attr] = nn.Parameter(q.dequantized_weight(), requires_grad=False)
