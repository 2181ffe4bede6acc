"""Whole-model conversion to and from shardq's quantized modules: every linear layer `sizing.quantized_layers`
names becomes a `Linear4bit` / `Linear8bit`, every fused MoE expert stack a `QuantizedExperts`, and back."""

from __future__ import annotations

from typing import Any

from torch import nn
from tqdm.auto import tqdm

from shardq.config import QuantConfig
from shardq.quant import sizing
from shardq.quant.experts import dequantize_stacks, quantize_stacks
from shardq.quant.linear import PROGRESS_MIN_LAYERS, Linear4bit, Linear8bit, QuantLinear, _set_submodule


def quantize_model(model: nn.Module, cfg: Any, skip: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """Replace in place every layer `shardq.quant.sizing.quantized_layers` names (nn.Linear and subclasses,
    transformers' Conv1D; not MultiheadAttention's out_proj, tied heads or what `cfg.skips()` or `skip` name: exact
    name, dotted component or prefix) by its quantized form, and every fused MoE expert stack
    `sizing.quantized_experts` names by a `QuantizedExperts` (shardq.quant.experts). Returns the model. No-op for
    method "none". `cfg`: anything `QuantConfig.from_any` accepts (a QuantConfig, a method name such as "nf4", ...)."""
    cfg = QuantConfig.from_any(cfg)
    targets = list(sizing.quantized_layers(model, cfg, skip).items())
    stacks = sizing.quantized_experts(model, cfg, skip)
    on_meta = [n for n, m in targets if m.weight.device.type == "meta"]
    on_meta += [n for n in stacks if model.get_parameter(n).device.type == "meta"]
    if on_meta:  # checked before any layer is replaced
        raise ValueError(
            f"{len(on_meta)} layer(s) have weights on the meta device (e.g. {on_meta[0]!r}): load the "
            "weights first, or build empty layers with Linear4bit.empty / Linear8bit.empty"
        )
    cls = Linear8bit if cfg.method == "int8" else Linear4bit
    for name, lin in tqdm(
        targets,
        desc=f"shardq: quantizing to {cfg.method}",
        unit="layer",
        disable=len(targets) < PROGRESS_MIN_LAYERS,
        leave=False,
    ):
        _set_submodule(model, name, cls.from_linear(lin, cfg))
    quantize_stacks(model, stacks, cfg)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear in place by an `nn.Linear` with its dequantized weight, and every quantized
    expert stack by a float parameter of its dequantized values."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, q in targets:
        _set_submodule(model, name, q.dequantize())
    dequantize_stacks(model)
    return model
