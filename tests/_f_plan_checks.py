"""An independent oracle for plans: recompute every device's bytes from the model and check the promises."""

from __future__ import annotations

import math

import torch
from torch import nn

from shardq.config import QuantConfig
from shardq.planning.planner import Plan


def _is_conv1d(mod: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, Conv1D)


def oracle_quantizable(mod: nn.Module) -> bool:
    """What bitsandbytes converts: nn.Linear and subclasses and transformers' Conv1D, but not
    MultiheadAttention's out_proj."""
    if isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def oracle_weight_bytes(linear: nn.Module, quant: QuantConfig) -> int:
    """Bytes of one quantized Linear (or Conv1D, weight [in, out]) weight, written out from DESIGN.md
    independently of shardq.quant.sizing."""
    out_f, in_f = linear.weight.shape
    if _is_conv1d(linear):
        out_f, in_f = in_f, out_f
    return _matrix_bytes(out_f, in_f, quant)


def oracle_expert_stack(mod: nn.Module, t: torch.Tensor) -> bool:
    """A fused MoE expert stack shardq quantizes: a 3-D float parameter [E, out, in] of a transformers experts
    module in the non-transposed layout (the decorator sets `is_transposed`)."""
    from transformers.integrations.moe import use_experts_implementation  # noqa: F401  (the layout's owner)

    return (isinstance(t, nn.Parameter) and t.dim() == 3 and t.is_floating_point()
            and getattr(mod, "is_transposed", None) is False and hasattr(mod, "has_gate"))


def oracle_stack_bytes(t: torch.Tensor, quant: QuantConfig) -> int:
    """E quantized [out, in] matrices, each stored exactly as one quantized linear weight."""
    return t.shape[0] * _matrix_bytes(t.shape[1], t.shape[2], quant)


def _matrix_bytes(out_f: int, in_f: int, quant: QuantConfig) -> int:
    n = out_f * in_f
    if quant.method == "int8":
        return n + 4 * out_f
    nb = -(-n // quant.blocksize)
    stats = (nb + 4 * -(-nb // 256) + 256 * 4 + 4) if quant.double_quant else 4 * nb
    return -(-n // 2) + stats + 16 * 4


def _covering(plan: Plan, name: str) -> str:
    """The entry owning tensor `name`: its longest prefix among the keys (nested only under own-tensor entries)."""
    keys = [k for k in plan.device_map if k == "" or name == k or name.startswith(k + ".")]
    assert keys, f"{name} is not covered"
    best = max(keys, key=lambda k: len(k.split(".")) if k else 0)
    own = {p.name for p in plan.placements if p.own_tensors_only}
    assert all(k in own for k in keys if k != best), f"{name} is covered by {keys}"
    return best


def expected_totals(model: nn.Module, plan: Plan) -> dict:
    """Per-device bytes recomputed from the model's tensors and the plan's device_map."""
    q = plan.quant
    shared = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    seen: dict = {d: {} for d in plan.budgets}
    runs = {p.name: p.run for p in plan.placements}
    for mname, mod in model.named_modules(remove_duplicate=False):
        tensors = list(mod._parameters.items()) + list(mod._buffers.items())
        for tname, t in tensors:
            if t is None:
                continue
            full = f"{mname}.{tname}" if mname else tname
            key = _covering(plan, full)
            dev = plan.device_map[key]
            stack = oracle_expert_stack(mod, t) and not q.skips(full)
            quantized = ((oracle_quantizable(mod) and tname == "weight") or stack) and q.method != "none" \
                and not q.skips(mname) and shared[id(t)] == 1
            # without a GPU, quantized weights stay packed off-GPU (unless fp32_cpu_offload asks for fp32)
            packed = plan.execution_device is None and q.method != "none" and not q.fp32_cpu_offload
            # "cpu" blocks compute in fp32; disk blocks are stored for the plan's default CPU mode
            run = runs[key] if dev == "cpu" else plan.cpu_mode
            fp32 = not isinstance(dev, int) and run == "cpu" and not (packed and quantized)
            if fp32:
                size = t.numel() * (4 if t.is_floating_point() else t.element_size())
            elif quantized:
                size = oracle_stack_bytes(t, q) if stack else oracle_weight_bytes(mod, q)
            else:
                size = t.numel() * t.element_size()
            seen[dev][(id(t), fp32)] = size  # a tied tensor in fp32 and streamed blocks is held twice
    return {d: sum(v.values()) for d, v in seen.items()}


def check_plan(model: nn.Module, plan: Plan, tied_together: bool = True) -> None:
    """Every promise a plan makes: coverage, exact bytes, caps with reserves, tied groups, stream buffers."""
    assert plan.totals == expected_totals(model, plan)
    for d, budget in plan.budgets.items():
        assert plan.totals[d] + plan.reserves[d] <= budget, (d, plan.totals[d], plan.reserves[d], budget)
        assert plan.reserves[d] == sum(plan.reserve_detail[d].values())
    assert [p.name for p in plan.placements] == list(plan.device_map)
    for p in plan.placements:
        assert p.device == plan.device_map[p.name]
        if p.device == "cpu":  # the plan's default, or the per-block rule with its reason (shardq.planning.runmode)
            assert p.run in ("cpu", "stream") and p.reason
            per_block = plan.offload_mode if isinstance(plan.offload_mode, dict) else {}
            key = max((k for k in per_block if k == "" or p.name == k or p.name.startswith(k + ".")), key=len,
                      default=None)  # a per-block forced mode: the longest name covering the block
            if key is not None:
                assert (p.run, p.reason) == (per_block[key], f"forced by offload_mode[{key!r}]"), (p.name, p.reason)
            else:
                assert p.run == plan.cpu_mode or p.reason.startswith(("lookup", "holds nested", "computed on the CPU")), \
                    (p.name, p.reason)
        else:
            assert p.run == ("gpu" if isinstance(p.device, int) else "disk")
    if tied_together and plan.strategy != "explicit":
        for group in plan.tied_groups:
            devices = {plan.device_map[_covering(plan, n)] for n in group}
            assert len(devices) == 1, (group, devices)
    streamed = [p.nbytes for p in plan.placements if p.run in ("stream", "disk")]
    if streamed:  # two slots of the largest streamed block where it runs: the execution GPU, else the host
        where = plan.execution_device if plan.execution_device is not None else "cpu"
        assert plan.reserve_detail[where]["stream"] >= 2 * max(streamed)
    disk = [p.nbytes for p in plan.placements if p.run == "disk"]
    if disk and "cpu" in plan.budgets:
        assert plan.reserve_detail["cpu"]["disk staging"] == 2 * max(disk)
    for d in plan.budgets:
        if isinstance(d, int) and plan.totals[d]:
            assert plan.reserve_detail[d]["activations"] > 0
    if plan.totals.get("cpu"):
        tensors = list(model.parameters()) + list(model.buffers())
        assert plan.reserve_detail["cpu"]["load"] == max(t.numel() * t.element_size() for t in tensors)
    assert set(plan.offload_modes) == {p.name for p in plan.placements if not isinstance(p.device, int)}
    assert not any(math.isnan(v) for v in plan.totals.values())


def meta_linear(out_f: int, in_f: int, bias: bool = True, dtype: torch.dtype = torch.float16) -> nn.Linear:
    with torch.device("meta"):
        return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
