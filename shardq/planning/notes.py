"""The warnings a plan carries: tied tensors split over devices, linear-like layers and fused MoE expert stacks
left unquantized (and why)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from shardq.config import QuantConfig
from shardq.memory import DeviceKey, device_label, format_size
from shardq.planning.units import Unit
from shardq.quant import sizing


def unquantized_warnings(model: nn.Module, quant: QuantConfig) -> list[str]:
    """Linear-like layers that stay in their dtype although no skip rule asked for it (today only
    MultiheadAttention's out_proj, whose weight the attention reads directly)."""
    if quant.method == "none":
        return []
    kept = [n for n, m in model.named_modules() if sizing.linear_shape(m) is not None and not sizing.quantizable(m)]
    if not kept:
        return []
    kind = type(model.get_submodule(kept[0])).__name__
    return [
        f"{len(kept)} linear-like layer(s) (e.g. {kept[0]!r}, {kind}) are not quantized to {quant.method}: "
        "MultiheadAttention reads their weight directly, so they stay in their own dtype"
    ]


def expert_warnings(model: nn.Module, quant: QuantConfig) -> list[str]:
    """Fused MoE expert weights (3-D parameters of `*Experts` modules) that stay in their dtype although no skip
    rule asked for it: those shardq cannot quantize per expert (`sizing.fused_expert_params`, e.g. transposed
    [E, in, out] stacks)."""
    if quant.method == "none":
        return []
    stacks = sizing.quantized_experts(model, quant)
    kept = [
        (full, p)
        for m_name, m in model.named_modules()
        if "Experts" in type(m).__name__
        for p_name, p in m._parameters.items()
        if p is not None
        and p.dim() == 3
        and (full := f"{m_name}.{p_name}") not in stacks
        and not quant.skips(m_name)
        and not quant.skips(full)
    ]
    if not kept:
        return []
    nbytes = sum(p.numel() * p.element_size() for _, p in kept)
    return [
        f"{len(kept)} fused MoE expert tensor(s) (e.g. {kept[0][0]!r}, {format_size(nbytes)} in all) are not in "
        f"the [experts, out, in] layout shardq quantizes per expert and are not quantized to {quant.method}: "
        "they stay in their own dtype, as bitsandbytes leaves every fused expert tensor"
    ]


def tie_warnings(units: list[Unit], assign: Mapping[str, DeviceKey]) -> list[str]:
    where: dict[int, dict[DeviceKey, str]] = {}
    for u in units:
        for e in u.entries:
            where.setdefault(e.key, {}).setdefault(assign[u.name], e.name)
    return [
        f"tied tensor {', '.join(names.values())} is split over devices {[device_label(d) for d in names]}: "
        "it is stored once per device"
        for names in where.values()
        if len(names) > 1
    ]
