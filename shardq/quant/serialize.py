"""Quantized checkpoints in the safetensors layout that transformers + bitsandbytes write, both ways.

Per 4-bit linear `<m>`: `<m>.weight` uint8 [ceil(n/2), 1], `<m>.weight.absmax`, `<m>.weight.quant_map` fp32 [16],
with double quant `<m>.weight.nested_absmax` and `<m>.weight.nested_quant_map`, and
`<m>.weight.quant_state.bitsandbytes__<nf4|fp4>`: a uint8 tensor holding the UTF-8 JSON of the non-tensor state
(quant_type, blocksize, dtype, shape, nested_blocksize, nested_dtype, nested_offset). Per 8-bit linear:
`<m>.weight` int8 [out, in], `<m>.SCB` fp32 [out], `<m>.weight_format` uint8 0 (row-major). A GPT-2 `Conv1D`
(float weight [in, out]) is stored quantized exactly as a Linear [out, in], as transformers transposes it for
bitsandbytes; it loads back as a Linear8bit/Linear4bit. The quantization
settings go into config.json's `quantization_config`. Files are read through `shardq.checkpoint.index` (headers
first, every check before any tensor is placed); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from shardq.checkpoint.conversions import renamed_index, reverse_renamed
from shardq.checkpoint.index import CheckpointError, CheckpointIndex, index_checkpoint, read_tensor
from shardq.config import BLOCKSIZES_4BIT, NESTED_BLOCKSIZE, QuantConfig, from_bnb_dict, to_bnb_dict
from shardq.formats import blockwise, codebooks
from shardq.memory import parse_size
from shardq.quant import sizing
from shardq.quant.linear import (
    PROGRESS_MIN_LAYERS,
    Linear4bit,
    Linear8bit,
    QuantLinear,
    _set_submodule,
    empty_quantized,
)

QS_PREFIX = "weight.quant_state.bitsandbytes__"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---------------- writing ----------------


def pack_json(d: Mapping[str, Any]) -> torch.Tensor:
    """uint8 tensor of the UTF-8 JSON of `d`, as bitsandbytes packs its quant_state."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: torch.Tensor, name: str) -> dict[str, Any]:
    try:
        d = json.loads(bytes(t.to(torch.uint8).cpu().reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"tensor {name!r} is not the packed JSON of a bitsandbytes quant_state ({exc})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"tensor {name!r} is not the packed JSON of a bitsandbytes quant_state")
    return d


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def module_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """A quantized linear's tensors under their bitsandbytes names (relative to the module)."""
    out: dict[str, torch.Tensor] = {"weight": m.weight}
    if isinstance(m, Linear8bit):
        out.update(SCB=m.SCB, weight_format=torch.tensor(0, dtype=torch.uint8))
    else:
        out.update({"weight.absmax": m.absmax, "weight.quant_map": m.quant_map})
        meta: dict[str, Any] = {
            "quant_type": m.quant_type,
            "blocksize": m.blocksize,
            "dtype": _dtype_name(m.dtype),
            "shape": [m.out_features, m.in_features],
        }
        if m.double_quant:
            out.update({"weight.nested_absmax": m.nested_absmax, "weight.nested_quant_map": m.nested_quant_map})
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=m.offset_value())
        out[QS_PREFIX + m.quant_type] = pack_json(meta)
    if m.bias is not None:
        out["bias"] = m.bias
    return out


def bnb_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors in the bitsandbytes layout (CPU, contiguous); tied tensors stored once."""
    qnames = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if owner in qnames:
            continue
        key = (t.untyped_storage().data_ptr(), t.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    for n in sorted(qnames):
        for k, t in module_tensors(model.get_submodule(n)).items():
            out[f"{n}.{k}"] = t.detach()
    return {k: v.to("cpu").contiguous() for k, v in out.items()}


def infer_config(model: nn.Module) -> QuantConfig:
    """The QuantConfig a model's quantized linears were built with (method "none" if it has none)."""
    for m in model.modules():
        if isinstance(m, Linear4bit):
            return QuantConfig(
                method=m.quant_type, blocksize=m.blocksize, double_quant=m.double_quant, compute_dtype=m.compute_dtype
            )
        if isinstance(m, Linear8bit):
            return QuantConfig(method="int8", threshold=m.threshold, compute_dtype=m.compute_dtype)
    return QuantConfig()


def bnb_config_dict(cfg: QuantConfig) -> dict[str, Any]:
    """config.json's `quantization_config`, with the private `_load_in_*` keys transformers also writes."""
    d = to_bnb_dict(cfg)
    d.update(_load_in_4bit=d["load_in_4bit"], _load_in_8bit=d["load_in_8bit"])
    return d


def _main_float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The float dtype holding the most bytes among the unquantized tensors."""
    by: dict[torch.dtype, int] = {}
    for k, t in tensors.items():
        if t.is_floating_point() and ".weight." not in k and not k.endswith(".SCB"):
            by[t.dtype] = by.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(by, key=by.__getitem__) if by else torch.float16


def save_quantized(
    model: nn.Module, path: str | os.PathLike, cfg: QuantConfig | None = None, max_shard_size: int | str | None = None
) -> Path:
    """Write the model in the bitsandbytes layout and `config.json` (the model's transformers config if it has
    one, with `quantization_config`) into directory `path`; returns the directory. One `model.safetensors`, or
    with `max_shard_size` (bytes or a size such as "2GB") shards plus `model.safetensors.index.json`, as
    transformers' `save_pretrained` writes them. Refuses a model with quantized fused MoE expert stacks
    (`_refuse_expert_stacks`) before writing anything."""
    _refuse_expert_stacks(model)
    cfg = infer_config(model) if cfg is None else QuantConfig.from_any(cfg)
    if cfg.method == "none":
        raise ValueError("the model has no quantized layers: run shardq.quantize_model(model, cfg) first")
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    qdict = bnb_config_dict(cfg)
    tensors = reverse_renamed(model, bnb_state_dict(model))  # the names transformers writes (GPT-NeoX embed_out)
    _write_shards(tensors, root, limit, {"format": "pt", "quantization_config": json.dumps(qdict)})
    hf_cfg = getattr(model, "config", None)
    config = hf_cfg.to_dict() if hf_cfg is not None and hasattr(hf_cfg, "to_dict") else {}
    config["quantization_config"] = qdict
    if config:  # transformers loads the unquantized tensors in the dtype config.json names
        config["dtype"] = _dtype_name(_main_float_dtype(tensors))
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return root


def _refuse_expert_stacks(model: nn.Module) -> None:
    """bitsandbytes has no layout for fused MoE experts: transformers + bitsandbytes would read such tensors as float
    3-D parameters and load garbage, so a model holding any `QuantizedExperts` is not written."""
    from shardq.quant.experts import QuantizedExperts

    stacks = [n for n, m in model.named_modules() if isinstance(m, QuantizedExperts)]
    if stacks:
        experts = sorted({n.rpartition(".")[0] for n in stacks})
        raise ValueError(
            f"{len(stacks)} fused MoE expert stack(s) are quantized (e.g. {stacks[0]!r}); the bitsandbytes layout has "
            "no format for them, so transformers would misread them. Save the float model and quantize it on load "
            "(shardq.load_sharded(..., quant=...)), or quantize with the experts kept float: "
            f"quantize_model(model, cfg, skip=[{experts[0]!r}, ...]) (any name component, e.g. 'experts', works)"
        )


def _write_shards(tensors: Mapping[str, torch.Tensor], root: Path, limit: int | None, meta: dict[str, str]) -> None:
    """Tensors in order into shards of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], root / "model.safetensors", metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, root / fname, metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------- reading ----------------


def checkpoint_config(path: str | os.PathLike, index: CheckpointIndex | None = None) -> QuantConfig:
    """The QuantConfig of a quantized checkpoint: config.json's `quantization_config`, else the safetensors
    metadata; an error if neither says how it was quantized."""
    p = Path(path)
    cfg_file = (p if p.is_dir() else p.parent) / "config.json"
    if cfg_file.is_file():
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from None
        if isinstance(raw, dict) and isinstance(raw.get("quantization_config"), dict):
            return from_bnb_dict(raw["quantization_config"])
    index = index_checkpoint(p) if index is None else index
    if "quantization_config" in index.metadata:
        return from_bnb_dict(json.loads(index.metadata["quantization_config"]))
    raise CheckpointError(
        f"{p} does not say how it was quantized (no quantization_config in config.json or in "
        "the safetensors metadata): load it as a float checkpoint instead"
    )


@dataclass
class LayerSpec:
    """How one linear is stored in a checkpoint: method "int8", "nf4"/"fp4" or "none", with its 4-bit state."""

    method: str
    meta: dict[str, Any]


def layer_spec(index: CheckpointIndex, name: str, read: Callable[[str], torch.Tensor]) -> LayerSpec:
    """Detect how linear `name` is stored (reads only the small packed quant_state JSON, if any)."""
    if f"{name}.SCB" in index.tensors:
        return LayerSpec("int8", {})
    for qt in codebooks.QUANT_TYPES:
        key = f"{name}.{QS_PREFIX}{qt}"
        if key in index.tensors:
            meta = unpack_json(read(key), key)
            if meta.get("quant_type", qt) != qt:
                raise CheckpointError(
                    f"tensor {key!r} says quant_type={meta.get('quant_type')!r}, its name says {qt!r}"
                )
            return LayerSpec(qt, meta)
    return LayerSpec("none", {})


Layout = dict[str, tuple[tuple[torch.dtype, ...], int]]


def expected_layout(name: str, spec: LayerSpec, out_f: int, in_f: int) -> Layout:
    """Checkpoint key -> (allowed dtypes, numel) for a quantized linear `name`; raises on a bad quant_state."""
    if spec.method == "int8":
        return {f"{name}.weight": ((torch.int8,), out_f * in_f), f"{name}.SCB": ((torch.float32,), out_f)}
    meta, key = spec.meta, f"{name}.{QS_PREFIX}{spec.method}"
    if list(meta.get("shape", [])) != [out_f, in_f]:
        raise CheckpointError(
            f"tensor {key!r}: shape {meta.get('shape')} does not match the model's "
            f"[{out_f}, {in_f}] layer {name!r}: the checkpoint belongs to another model"
        )
    bs = meta.get("blocksize")
    if bs not in BLOCKSIZES_4BIT:
        raise CheckpointError(f"tensor {key!r}: blocksize {bs!r} is unsupported (allowed: {BLOCKSIZES_4BIT})")
    numel = out_f * in_f
    nb = blockwise.n_blocks(numel, bs)
    out: Layout = {
        f"{name}.weight": ((torch.uint8,), (numel + 1) // 2),
        f"{name}.weight.quant_map": ((torch.float32,), 16),
    }
    if "nested_offset" in meta:
        if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise CheckpointError(
                f"tensor {key!r}: nested_blocksize {meta.get('nested_blocksize')} is not "
                f"{NESTED_BLOCKSIZE}, the only double-quant block size bitsandbytes writes"
            )
        out[f"{name}.weight.absmax"] = ((torch.uint8,), nb)
        out[f"{name}.weight.nested_absmax"] = ((torch.float32,), math.ceil(nb / NESTED_BLOCKSIZE))
        out[f"{name}.weight.nested_quant_map"] = ((torch.float32,), 256)
    else:
        # bitsandbytes' CPU backend saves absmax as bf16 [rows, blocks per row]; the values and count are what matter
        out[f"{name}.weight.absmax"] = (_FLOATS, nb)
    return out


def _check_entry(index: CheckpointIndex, key: str, dtypes: tuple[torch.dtype, ...], numel: int) -> None:
    info = index.tensors.get(key)
    if info is None:
        raise CheckpointError(
            f"tensor {key!r} is missing from {index.path}: the checkpoint is incomplete or was saved from another model"
        )
    if info.dtype not in dtypes or info.numel != numel:
        want = "/".join(_dtype_name(d) for d in dtypes)
        raise CheckpointError(
            f"tensor {key!r} is {_dtype_name(info.dtype)} {list(info.shape)}, expected {want} with {numel} elements"
        )


def linear_from_tensors(
    tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_f: int, out_f: int, cfg: QuantConfig, name: str = ""
) -> nn.Module:
    """A Linear4bit/Linear8bit filled from one layer's checkpoint tensors, named relative to the layer
    (`weight`, `weight.absmax`, ..., `SCB`, `bias`), on the device they are on. No re-quantization."""
    bias = tensors.get("bias")
    if spec.method == "int8":
        m = empty_quantized(
            in_f,
            out_f,
            bias is not None,
            cfg.replace(method="int8", double_quant=False),
            "meta",
            bias.dtype if bias is not None else torch.float16,
        )
        m.set_quantized({"weight": tensors["weight"].reshape(out_f, in_f), "SCB": tensors["SCB"].reshape(-1)}, bias)
        return m
    meta = spec.meta
    dq = "nested_offset" in meta
    lcfg = cfg.replace(method=spec.method, blocksize=int(meta["blocksize"]), double_quant=dq)
    dtype = getattr(torch, str(meta.get("dtype", "float16")), None)
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float16
    m = empty_quantized(in_f, out_f, bias is not None, lcfg, "meta", dtype)
    code = tensors["weight.quant_map"].float().reshape(-1)
    if codebooks.quant_type_of(code) != spec.method:
        raise CheckpointError(
            f"tensor {name}.weight.quant_map holds the {codebooks.quant_type_of(code)} code book, "
            f"but the quant_state says {spec.method}"
        )
    state = {"weight": tensors["weight"].reshape(-1, 1), "quant_map": code}
    if dq:
        state.update(
            absmax=tensors["weight.absmax"].reshape(-1),
            nested_absmax=tensors["weight.nested_absmax"].reshape(-1),
            nested_quant_map=tensors["weight.nested_quant_map"].reshape(-1),
            nested_offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=code.device),
        )
    else:
        state["absmax"] = tensors["weight.absmax"].reshape(-1).float()
    m.set_quantized(state, bias)
    return m


def _linears(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, out, in) of every layer a checkpoint may store quantized: linear-like layers (nn.Linear, GPT-2's
    Conv1D, whose quantized weight bitsandbytes writes as [out, in] like a Linear's) and quantized ones."""
    out = []
    for n, m in model.named_modules():
        shape = (m.out_features, m.in_features) if isinstance(m, QuantLinear) else sizing.linear_shape(m)
        if shape is not None:
            out.append((n, *shape))
    return out


def _tied_groups(model: nn.Module) -> list[list[str]]:
    by_obj: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_obj.setdefault(id(t), []).append(name)
    return [names for names in by_obj.values() if len(names) > 1]


def _validate_float(index: CheckpointIndex, key: str, t: torch.Tensor) -> None:
    info = index.tensors[key]
    if tuple(info.shape) != tuple(t.shape):
        raise CheckpointError(f"tensor {key!r} has shape {list(info.shape)}, the model expects {list(t.shape)}")
    if t.is_floating_point() != info.dtype.is_floating_point or (not t.is_floating_point() and info.dtype != t.dtype):
        raise CheckpointError(f"tensor {key!r} is {_dtype_name(info.dtype)}, the model expects {_dtype_name(t.dtype)}")


def _plan_load(model: nn.Module, index: CheckpointIndex, cfg: QuantConfig, read: Callable[[str], torch.Tensor]):
    """Check every tensor the model needs against the headers; returns (quantized layers, float keys)."""
    layers: dict[str, tuple[LayerSpec, int, int]] = {}
    for name, out_f, in_f in _linears(model):
        spec = layer_spec(index, name, read)
        if spec.method == "none":
            continue
        for key, (dtypes, numel) in expected_layout(name, spec, out_f, in_f).items():
            _check_entry(index, key, dtypes, numel)
        if model.get_submodule(name).bias is not None:
            _check_entry(index, f"{name}.bias", _FLOATS, out_f)
        layers[name] = (spec, in_f, out_f)
    tied = {n: g for g in _tied_groups(model) for n in g}
    floats: list[str] = []
    for key, t in model.state_dict(keep_vars=True).items():
        if key.rpartition(".")[0] in layers:
            continue
        if key in index.tensors:
            _validate_float(index, key, t)
            floats.append(key)
        elif not any(alias in index.tensors for alias in tied.get(key, [])):
            raise CheckpointError(
                f"tensor {key!r} is missing from {index.path}: the checkpoint is incomplete or "
                "was saved from another model"
            )
    return layers, floats


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def load_quantized(model: nn.Module, path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Load a bitsandbytes-layout checkpoint (written by transformers + bitsandbytes or by `save_quantized`)
    into `model` (float, meta or quantized; its architecture must match) without re-quantizing. Linears stored
    quantized become Linear4bit/Linear8bit; everything is checked against the file headers before any tensor is
    placed. Returns the model."""
    index = renamed_index(model, index_checkpoint(path))  # transformers' renames (GPT-NeoX embed_out -> lm_head)
    cfg = checkpoint_config(path, index)

    def read(key: str) -> torch.Tensor:
        return read_tensor(index.tensors[key])

    layers, floats = _plan_load(model, index, cfg, read)
    tied = _tied_groups(model)
    consumed = set(floats)
    built: dict[str, nn.Module] = {}
    for name, (spec, in_f, out_f) in tqdm(
        layers.items(),
        desc="shardq: loading quantized layers",
        unit="layer",
        disable=len(layers) < PROGRESS_MIN_LAYERS,
        leave=False,
    ):
        keys = [f"{name}.{r}" for r in _LAYER_KEYS + (QS_PREFIX + spec.method,) if f"{name}.{r}" in index.tensors]
        consumed.update(keys)
        rel = {k[len(name) + 1 :]: read(k).to(device) for k in keys if QS_PREFIX not in k and "weight_format" not in k}
        built[name] = linear_from_tensors(rel, spec, in_f, out_f, cfg, name)
    for name, m in built.items():
        _set_submodule(model, name, m)
    for key in floats:
        _assign(model, key, read(key).to(device))
    _retie(model, tied, set(floats))
    extra = sorted(set(index.tensors) - consumed)
    if extra:
        warnings.warn(f"{len(extra)} checkpoint tensor(s) not used by the model, e.g. {extra[:3]}", stacklevel=2)
    return model


_LAYER_KEYS = (
    "weight",
    "bias",
    "SCB",
    "weight_format",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
)


def _retie(model: nn.Module, groups: list[list[str]], loaded: set[str]) -> None:
    """Point every alias of a tied group (e.g. lm_head.weight -> embed_tokens.weight) at the loaded tensor."""
    for group in groups:
        src_key = next((k for k in group if k in loaded), None)
        if src_key is None:
            continue
        owner, _, leaf = src_key.rpartition(".")
        src_mod = model.get_submodule(owner) if owner else model
        src = src_mod._parameters.get(leaf, src_mod._buffers.get(leaf))
        for alias in group:
            if alias != src_key:
                a_owner, _, a_leaf = alias.rpartition(".")
                mod = model.get_submodule(a_owner) if a_owner else model
                if a_leaf in mod._parameters:
                    mod._parameters[a_leaf] = src
                elif a_leaf in mod._buffers:
                    mod._buffers[a_leaf] = src
