"""transformers glue: meta-device models from a local config.json, no-split blocks, tied parameters.

Everything here reads local files only (a directory path never reaches the hub) and allocates no weights:
models are built under `torch.device("meta")`, so a 70B architecture costs a few MB of Python objects.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelConfigError(ValueError):
    """A config.json that is missing or names an architecture transformers cannot build."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelConfigError(
            "building a model from config.json needs transformers: pip install 'shardq[hf]'"
        ) from None
    return transformers


def load_config(path: str | os.PathLike) -> Any:
    """The transformers config of a local checkpoint directory, read offline (no hub access, no remote code)."""
    p = Path(path)
    if not p.exists():
        raise ModelConfigError(
            f"{p} does not exist: give a checkpoint directory holding config.json and the "
            "safetensors files, or a config.json"
        )
    if p.is_file() and p.suffix == ".safetensors":
        raise ModelConfigError(
            f"{p} is a safetensors file: give the directory holding it and its config.json "
            f"({p.parent}), or the config.json alone to plan from the architecture"
        )
    cfg_file = p / "config.json" if p.is_dir() else p
    if not cfg_file.is_file():
        raise ModelConfigError(
            f"{cfg_file} does not exist: a checkpoint directory needs the config.json that "
            "save_pretrained writes next to the safetensors files"
        )
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{cfg_file} is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ModelConfigError(
            f"{cfg_file} is not a text file: give a config.json or the checkpoint directory holding it"
        ) from None
    if "model_type" not in raw:
        raise ModelConfigError(f"{cfg_file} has no 'model_type': it is not a transformers config.json")
    tf = _transformers()
    try:
        return tf.AutoConfig.from_pretrained(str(cfg_file))
    except (ValueError, KeyError) as exc:
        raise ModelConfigError(
            f"{cfg_file}: transformers {tf.__version__} cannot read model_type "
            f"{raw['model_type']!r} ({exc}); upgrade transformers or check the config"
        ) from None


def model_class(config: Any) -> Any:
    """The class to build: the config's first listed architecture, else a seq2seq LM, causal LM or base model."""
    tf = _transformers()
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    autos = ["AutoModelForSeq2SeqLM"] if getattr(config, "is_encoder_decoder", False) else []
    autos += ["AutoModelForCausalLM", "AutoModel"]
    for auto in autos:
        mapping = getattr(tf, auto)._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise ModelConfigError(f"transformers has no model class for config {type(config).__name__}")


def meta_model_from_config(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """Build `config`'s model on the meta device in `dtype` (config's dtype, else float32), weights tied."""
    dtype = dtype or _config_dtype(config) or torch.float32
    cls = model_class(config)
    with torch.device("meta"):
        try:
            model = cls._from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = cls._from_config(config, torch_dtype=dtype)
    model.eval()
    return model


def meta_model_from_dir(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model for the local `path`/config.json on the meta device (offline, no weights read)."""
    return meta_model_from_config(load_config(path), dtype)


def _config_dtype(config: Any) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, value.removeprefix("torch."))
    return None


def no_split_modules(model: nn.Module) -> list[str]:
    """Class names of blocks that must stay on one device.

    transformers' `_no_split_modules` of the model and its pretrained submodules; when none are declared,
    the classes repeated within a ModuleList (decoder layers of a hand-written model).
    """
    names: set[str] = set()
    for m in model.modules():
        declared = getattr(m, "_no_split_modules", None)
        if declared:
            names.update(declared)
    if names:
        return sorted(names)
    return sorted(repeated_block_classes(model))


def repeated_block_classes(model: nn.Module) -> set[str]:
    """Classes that appear at least twice among the children of some ModuleList and hold tensors."""
    found: set[str] = set()
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            counts = Counter(type(c).__name__ for c in m if _has_tensors(c))
            found.update(name for name, n in counts.items() if n >= 2)
    return found


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (embedding and lm_head), each sorted; groups of 2+."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return sorted(sorted(names) for names in by_id.values() if len(names) > 1)


def base_model_prefix(model: nn.Module) -> str:
    """transformers' `base_model_prefix` when the model wraps a base model under that name, else ""."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    return prefix if prefix and hasattr(model, prefix) else ""


QUANT_STATE_SUFFIXES = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".SCB",
    ".weight_format",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
    ".offset",
)


def check_checkpoint(model: nn.Module, tensors: Mapping[str, Any]) -> list[str]:
    """Differences between the model's state and a checkpoint's tensors (names and shapes), as messages.

    Tied copies and non-persistent buffers the checkpoint may omit are not reported; a checkpoint saved from
    the base model (without `base_model_prefix`) is matched as transformers matches it; bitsandbytes
    quantization statistics are expected extras.
    """
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = {n: n for n in tensors}
    prefix = base_model_prefix(model)
    if prefix and not set(names) & set(state):
        names = {n: f"{prefix}.{n}" for n in tensors}
    ckpt = {model_name: tensors[n] for n, model_name in names.items()}
    tied = {n for group in tied_parameter_groups(model) for n in group if any(g in ckpt for g in group)}
    missing = [k for k in state if k not in ckpt and k not in tied]
    extra = [k for k in ckpt if k not in state and not k.endswith(QUANT_STATE_SUFFIXES)]
    wrong = []
    for k, info in ckpt.items():
        if k in state and tuple(info.shape) != state[k]:
            prequantized = info.dtype in (torch.uint8, torch.int8)
            if not prequantized:
                wrong.append(f"{k}: checkpoint {list(info.shape)} vs model {list(state[k])}")
    out = []
    for label, items in (
        ("missing from the checkpoint", missing),
        ("not in the model", extra),
        ("shape differs", wrong),
    ):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            out.append(f"{len(items)} tensor(s) {label}: {', '.join(items[:8])}{more}")
    return out


def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model`'s forward takes the KV cache in the installed transformers: `cache` in recent
    releases, `past_key_values` before (an unknown keyword is swallowed by `**kwargs`, so the wrong one silently
    runs without the cache)."""
    cls: type = type(model)  # as `type`: mypy does not see a `type[Any]` as Hashable (the cache's key)
    return _cache_kwarg_of(cls)


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    """`cache_kwarg` per class: read from the signatures once (callers ask on every step)."""
    for fn in (getattr(cls, "prepare_inputs_for_generation", None), getattr(cls, "forward", None)):
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        if "cache" in params:
            return "cache"
        if "past_key_values" in params:
            return "past_key_values"
    return "cache"
