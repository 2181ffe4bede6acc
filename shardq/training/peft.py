"""PEFT LoRA on shardq's quantized layers (QLoRA), and the kbit-training preparation of a shardq model.

PEFT picks a LoRA layer class per target by type (its bitsandbytes dispatchers, then `nn.Linear`); shardq's
`Linear4bit`/`Linear8bit` are neither, so PEFT would refuse them. PEFT's own extension point is the custom-module
mapping of a `LoraConfig` (`_register_custom_module`); `register_with_peft` (run on import) makes PEFT apply
shardq's mapping itself whenever a target's base layer is a shardq layer (and place the new adapters where the
layer computes, not where its weights rest), so `get_peft_model(model,
LoraConfig(target_modules=[...]))` and `PeftModel.from_pretrained` work unchanged. The mapping is not saved in
`adapter_config.json`, so saved adapters stay plain PEFT adapters.

The LoRA layer is PEFT's `lora.Linear` (same forward, dropout, scaling, save/load) around the frozen quantized
layer, whose backward is `shardq.kernels.autograd`. Merging dequantizes, adds the LoRA delta and quantizes again
(as PEFT does for bitsandbytes: rounding changes the outputs slightly).

Offloaded blocks: a streamed block's weights live in a GPU slot only during its forward, and the next blocks
reuse the slot, so the backward needs them again: `prepare_model_for_kbit_training` checkpoints each streamed
block around its streaming forward (`shardq.training.streaming`), so the recomputation streams it in again right
before its backward, and turns on transformers' checkpointing for the resident layers. It also records on each
quantized layer where its block computes, so the adapters (small, trained, never streamed) are created on that device.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraConfig, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from shardq.quant.linear import QuantLinear
from shardq.training.streaming import OFFLOADED as _OFFLOADED
from shardq.training.streaming import checkpoint_offloaded_blocks

_PLAIN_INITS = (True, False, "gaussian")  # LoRA inits that do not read the base weight


class QuantLoraLinear(LoraLinear):
    """PEFT's LoRA `Linear` around a shardq `Linear4bit` or `Linear8bit` (frozen, quantized)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        if config.init_lora_weights not in _PLAIN_INITS:
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} reads the base weight, which shardq "
                f"stores quantized: use one of {_PLAIN_INITS} for LoRA on shardq layers"
            )
        if config.fan_in_fan_out:
            raise ValueError(
                "fan_in_fan_out=True: shardq layers store [out, in] weights (GPT-2's Conv1D is "
                "transposed when quantized); set fan_in_fan_out=False"
            )
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return int(module.in_features), int(module.out_features)

    @property
    def lora_variants(self) -> dict:
        """Plain LoRA only: the variants (DoRA, ...) read or rescale the base weight."""
        return {(): None}

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device or adapter_device(self.get_base_layer()))

    def place_adapters(self) -> None:
        """Every adapter onto the device the layer computes on (not the weight's device, which for a streamed or
        disk layer is where it rests: host memory or meta)."""
        for name in list(self.lora_A):
            self._move_adapter_to_device_of_base_layer(name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active adapters into the quantized weight (dequantize, add, quantize again)."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.lora_A:
                self._fold(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take the merged adapters out again (dequantize, subtract, quantize: not bit-exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                self._fold(name, -1.0, False)

    def _fold(self, adapter: str, sign: float, safe: bool) -> None:
        base: Any = self.get_base_layer()
        if getattr(base, "shardq_offload", None) in _OFFLOADED or base.weight.device.type == "meta":
            raise ValueError(
                "cannot merge an adapter into a layer of a streamed or disk block (its weights are "
                "packed for streaming): merge on a model loaded without offload, or keep it unmerged"
            )
        warnings.warn("Merging LoRA into a quantized layer re-quantizes it: outputs change by rounding.", stacklevel=2)
        with torch.no_grad():
            self._fold_weights(base, adapter, sign, safe)

    def _fold_weights(self, base: Any, adapter: str, sign: float, safe: bool) -> None:
        weight = base.dequantized_weight(torch.float32)
        new = weight + sign * self.get_delta_weight(adapter).to(weight.device, torch.float32)
        bias = None if base.bias is None else base.bias.detach()
        if self.lora_bias[adapter]:
            if bias is None:
                raise ValueError("lora_bias=True needs a base layer with a bias to merge into")
            lora_b: Any = self.lora_B[adapter]
            bias = bias + sign * lora_b.bias.detach().to(bias) * self.scaling[adapter]
        if safe and not (torch.isfinite(new).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs or infs in the merged weight: adapter {adapter!r} seems broken")
        base.load_from_float(new.to(base.dtype), bias)


def adapter_device(layer: nn.Module) -> torch.device | None:
    """Where a quantized layer computes (its block's execution device when dispatched), i.e. where its adapters go.
    None when unknown (PEFT then uses the weight's device)."""
    dev = getattr(layer, "shardq_exec_device", None)
    if dev is not None:
        return dev
    if layer.weight.device.type == "meta":
        raise ValueError(
            "the layer's weights are on disk (meta at rest): call "
            "shardq.training.prepare_model_for_kbit_training(model) before get_peft_model"
        )
    return None


CUSTOM_MODULES: dict[type[nn.Module], type[nn.Module]] = {cls: QuantLoraLinear for cls in QuantLinear}


def _create_new_module(original):
    def create(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        custom = lora_config._custom_modules or {}
        if isinstance(base, QuantLinear) and not any(isinstance(base, k) for k in custom):
            lora_config._register_custom_module(CUSTOM_MODULES)
        return original(lora_config, adapter_name, target, **kwargs)

    create.__dict__["shardq_original"] = original  # a function attribute, which mypy cannot declare
    return create


def _replace_module(original):
    def replace(self: LoraModel, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if not isinstance(new_module, QuantLoraLinear):
            return original(self, parent, child_name, new_module, child)
        # PEFT's version also moves the adapters to the base weight's device: meta (values lost) for a disk
        # layer, host memory for a streamed one
        setattr(parent, child_name, new_module)
        new_module.place_adapters()
        return None

    replace.__dict__["shardq_original"] = original
    return replace


def register_with_peft() -> None:
    """Make PEFT's LoRA dispatch map shardq's quantized layers to `QuantLoraLinear`, with their adapters on the
    device the layer computes on (idempotent)."""
    original = LoraModel._create_new_module
    if getattr(original, "shardq_original", None) is not None:
        return
    if not hasattr(LoraConfig, "_register_custom_module") or not hasattr(LoraModel, "_replace_module"):
        raise ImportError("this peft version has no LoRA custom-module mapping: install peft>=0.14")
    LoraModel._create_new_module = staticmethod(_create_new_module(original))  # type: ignore[method-assign]
    LoraModel._replace_module = _replace_module(LoraModel._replace_module)  # type: ignore[method-assign]


def linear_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """The distinct last names of the model's quantized layers (PEFT `target_modules` for "all linear layers",
    which PEFT's own "all-linear" cannot find: it looks for `nn.Linear`)."""
    names = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    return sorted(names - set(skip))


def _record_exec_devices(model: nn.Module) -> list[str]:
    """Tag each quantized layer of a dispatched model with its block's mode and execution device; returns the
    names of streamed/disk blocks."""
    rt = getattr(model, "shardq_runtime", None)
    if rt is None:
        return []
    offloaded = []
    for name, block in rt.blocks.items():
        module = model.get_submodule(name) if name else model
        for layer in module.modules():
            if isinstance(layer, QuantLinear):
                layer.shardq_exec_device, layer.shardq_offload = block.exec_device, block.mode
        if block.mode in _OFFLOADED:
            offloaded.append(name)
    return offloaded


def _upcast_norms(model: nn.Module) -> int:
    """Norm weights of resident blocks to fp32 (PEFT's kbit preparation does this for stability); streamed
    blocks keep their packed dtype. Returns how many parameters were cast."""
    rt = getattr(model, "shardq_runtime", None)
    packed = {
        id(t)
        for b in (rt.blocks.values() if rt else ())
        if b.mode in _OFFLOADED
        for rec in b.owned
        for t in [rec.tensor]
    }
    n = 0
    for m in model.modules():
        if "norm" not in type(m).__name__.lower():
            continue
        for p in m.parameters(recurse=False):
            if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in packed:
                p.data = p.data.float()
                n += 1
    return n


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    upcast_norms: bool = True,
) -> nn.Module:
    """Get a shardq-quantized (and possibly dispatched) model ready for adapter training, as PEFT's helper of the
    same name does for bitsandbytes: every parameter frozen, norms in fp32 (`upcast_norms`), gradient
    checkpointing on (non-reentrant unless asked), input grads on for reentrant checkpointing; and records each
    quantized layer's execution device so `get_peft_model` puts its adapters there. Returns the model."""
    offloaded = _record_exec_devices(model)
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    if offloaded and not use_gradient_checkpointing:
        raise ValueError(
            f"{len(offloaded)} blocks are streamed ({offloaded[0]!r}, ...): their weights are only in "
            "a GPU slot during their forward, so the backward must stream them again: keep "
            "use_gradient_checkpointing=True"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    if upcast_norms:
        _upcast_norms(model)
    if use_gradient_checkpointing:
        _enable_checkpointing(model, kwargs)
        checkpoint_offloaded_blocks(model)
    return model


def _enable_checkpointing(model: Any, kwargs: dict) -> None:
    """transformers' activation checkpointing (its name since 5.x; `gradient_checkpointing_enable` before)."""
    if kwargs["use_reentrant"] and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            f"{type(model).__name__} has no activation_checkpointing_enable (not a transformers "
            "model): pass use_gradient_checkpointing=False and checkpoint its blocks yourself"
        )


register_with_peft()
