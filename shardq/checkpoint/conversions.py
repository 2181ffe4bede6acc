"""transformers 5 checkpoint-name conversions: old checkpoint names → the model's names, fused tensors composed.

transformers 5 renames some tensors on load (GPT-NeoX `embed_out.` → `lm_head.`, Mixtral `.block_sparse_moe.` →
`.mlp.`) and fuses others (per-expert `w1`/`w3`/`w2` weights → `experts.gate_up_proj` / `experts.down_proj`),
while checkpoints on the Hub and `save_pretrained` keep the old layout. `convert_source` applies the model's own
conversion mapping (`transformers.conversion_mapping.get_model_conversion_mapping`) to a checkpoint's lazy
`SourceTensor`s: a renamed tensor keeps its reader; each fused target becomes one composite `SourceTensor` whose
shape comes from the headers and whose `read()` copies its parts into their places in one preallocated tensor
(the layout transformers' operations give; host RAM peaks at the fused tensor plus one part). Models outside
transformers, or a transformers without conversion mappings, get their checkpoint unchanged.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardq.checkpoint.index import CheckpointIndex, TensorInfo
from shardq.checkpoint.source import LoadError, SourceTensor

Shape = tuple[int, ...]


@dataclass
class _Group:
    """The checkpoint tensors that one converter fuses into one model tensor."""

    target: str  # the model's name (checkpoint prefix kept; the loader's prefix rules apply after)
    converter: Any
    parts: dict[str, list[tuple[int | None, str]]] = field(default_factory=dict)  # pattern → [(index, key)]


def _mapping(model: nn.Module) -> tuple[list[Any], list[Any], Any] | None:
    """(renamings, converters, transformers' module) of a transformers model; None when there is nothing to do."""
    if "transformers" not in sys.modules:  # then the model is not a transformers one (and importing it costs RAM)
        return None
    try:
        from transformers import core_model_loading as cml
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    transforms = copy.deepcopy(get_model_conversion_mapping(model))  # renamings may hold state (GroupWeightRename)
    renamings = [t for t in transforms if isinstance(t, cml.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, cml.WeightConverter)]
    return (renamings, converters, cml) if renamings or converters else None


def _resolver(model: nn.Module) -> tuple[Callable[[str], str | None], dict[str, Shape]]:
    """The model's state shapes, and a lookup of a checkpoint-space name in them (as is, base prefix added or
    stripped, as the loader's name rewrites do)."""
    state = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(name: str) -> str | None:
        cands = [name] + ([f"{prefix}.{name}", name.removeprefix(f"{prefix}.")] if prefix else [])
        return next((c for c in cands if c in state), None)

    return resolve, state


def convert_source(model: nn.Module, source: Mapping[str, SourceTensor]) -> dict[str, SourceTensor]:
    """`source` keyed by the model's names after transformers' renames and fusions; raises one LoadError listing
    every problem of the fused groups (missing or mis-shaped parts, unknown operations)."""
    out, problems = apply_conversions(model, source)
    if problems:
        raise LoadError(
            "the checkpoint's tensors cannot be converted to the model's layout:\n  "
            + "\n  ".join(problems)
            + "\nNothing was loaded. Give the complete checkpoint saved for this model "
            "(every expert tensor, unchanged shapes)."
        )
    return out


def apply_conversions(
    model: nn.Module, source: Mapping[str, SourceTensor]
) -> tuple[dict[str, SourceTensor], list[str]]:
    """The converted source and the problems found (names and shapes only, nothing is read)."""
    found = _mapping(model)
    if found is None:
        return dict(source), []
    renamings, converters, cml = found
    resolve, state = _resolver(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    names: dict[str, str] = {}  # checkpoint key → its name in the converted source (a group's target for a part)
    groups: dict[str, _Group] = {}
    for key in sorted(source, key=cml.dot_natural_key):  # transformers' order: experts 0, 1, 2, ..., 10
        renamed, _ = cml.rename_source_key(key, renamings, [])
        target, pattern = cml.rename_source_key(renamed, [], converters)
        if pattern is not None and resolve(target) is not None:
            group = groups.setdefault(target, _Group(target, copy.deepcopy(by_pattern[pattern])))
            group.parts.setdefault(pattern, []).append((_index(pattern, renamed), key))
        renamed_ok = target != key and resolve(target) is not None and resolve(key) is None
        names[key] = target if target in groups or renamed_ok else key
    problems: list[str] = []
    out: dict[str, SourceTensor] = {}
    done: set[str] = set()
    for key, src in source.items():  # the checkpoint's own order; a composite where its first part was
        name = names[key]
        if name not in groups:
            out[name] = src
        elif name not in done:
            done.add(name)
            resolved = resolve(name)
            assert resolved is not None  # a group exists only for a target that resolves
            composite = _composite(groups[name], source, state[resolved], problems)
            if composite is not None:
                out[name] = composite
    return out, problems


def _index(pattern: str, renamed: str) -> int | None:
    """The expert index that the pattern's `*` stands for in `renamed` (None: the pattern has no index)."""
    if "*" not in pattern:
        return None
    m = re.search(pattern.replace("*.", r"(\d+)\."), renamed)
    return int(m.group(1)) if m else None


def _missing_parts(group: _Group, model_shape: Shape) -> list[str]:
    """Indices absent from a pattern while present in a sibling pattern, or below the model's expert count."""
    first_op = group.converter.operations[0]
    merge = type(first_op).__name__ == "MergeModulelist" and -len(model_shape) <= first_op.dim < len(model_shape)
    count = model_shape[first_op.dim] if merge else 0
    indices = {i for parts in group.parts.values() for i, _ in parts if i is not None}
    expected = indices | set(range(max(indices, default=-1) + 1)) | set(range(count))
    out = []
    for pattern in group.converter.source_patterns:
        parts = group.parts.get(pattern, [])
        if not parts:
            out.append(f"{group.target}: no checkpoint tensor matches {pattern!r}")
            continue
        if all(i is None for i, _ in parts):
            continue
        have = {i for i, _ in parts}
        out += [f"{_name_for(parts, i)}: missing (a part of {group.target})" for i in sorted(expected - have)]
    return out


def _name_for(parts: list[tuple[int | None, str]], index: int) -> str:
    """A sibling's checkpoint name with its index replaced by `index` (the name the missing tensor would have)."""
    i, key = parts[0]
    head, sep, tail = key.rpartition(f".{i}.")
    return f"{head}.{index}.{tail}" if sep else f"{key} (index {index})"


def _composite(
    group: _Group, source: Mapping[str, SourceTensor], model_shape: Shape, problems: list[str]
) -> SourceTensor | None:
    """One SourceTensor for a fused target, shape known from the headers; None (and problems) when it cannot be."""
    missing = _missing_parts(group, model_shape)
    if missing:
        problems.extend(missing)
        return None
    keys = [k for p in group.converter.source_patterns for _, k in group.parts.get(p, [])]
    srcs = [source[k] for k in keys]
    dtypes = {s.dtype for s in srcs}
    if len(dtypes) > 1:
        problems.append(
            f"{group.target}: its parts have different dtypes {sorted(str(d) for d in dtypes)} "
            f"({', '.join(f'{s.name} {s.dtype}' for s in srcs[:4])})"
        )
        return None
    try:
        layout = _layout(group, source)
    except LoadError as exc:
        problems.append(str(exc))
        return None
    shape = layout[0]
    name = " + ".join(_pattern_name(group.parts[p]) for p in group.converter.source_patterns)
    reader = _composite_reader(group, source, layout, srcs[0].dtype)
    nbytes = sum(s.nbytes for s in srcs)
    return SourceTensor(name, shape, srcs[0].dtype, nbytes, reader, min(s.order for s in srcs), None)


def _pattern_name(parts: list[tuple[int | None, str]]) -> str:
    i, key = parts[0]
    head, sep, tail = key.rpartition(f".{i}.")
    return f"{head}.*.{tail}" if sep and len(parts) > 1 else key


Piece = tuple[str, tuple[slice, ...]]  # a checkpoint tensor and the region of the fused tensor it fills
Item = tuple[Shape, list[Piece]]


def _layout(group: _Group, source: Mapping[str, SourceTensor]) -> Item:
    """The fused tensor's shape and where each part lands in it, from the part shapes and transformers' operations
    (MergeModulelist stacks each pattern's parts, Concatenate joins the patterns in order): `read` then fills one
    preallocated tensor part by part."""
    conv = group.converter
    state: dict[str, list[Item] | Item] = {
        p: [(tuple(source[k].shape), [(k, tuple(slice(0, n) for n in source[k].shape))]) for _, k in group.parts[p]]
        for p in conv.source_patterns
        if p in group.parts
    }
    for op in conv.operations:
        kind = type(op).__name__
        if kind == "MergeModulelist":
            single = len(state) == 1
            state = {
                (conv.target_patterns[0] if single else p): _stack(v, op.dim, group.target) for p, v in state.items()
            }
        elif kind == "Concatenate":
            items: list[Item] = []
            for p in conv.source_patterns:
                if p in state:
                    v = state.pop(p)
                    items.extend(v if isinstance(v, list) else [v])
            state = {conv.target_patterns[0]: _cat(items, op.dim, group.target)}
        else:
            raise LoadError(
                f"{group.target}: transformers' conversion {conv.source_patterns} → "
                f"{conv.target_patterns} uses the operation {kind}, which shardq cannot size from the "
                "headers: load this model with transformers' from_pretrained, or save the checkpoint in "
                "the model's own layout"
            )
    if len(state) != 1:
        raise LoadError(f"{group.target}: the conversion {conv.source_patterns} gives {len(state)} tensors, not one")
    value = next(iter(state.values()))
    if isinstance(value, list):
        if len(value) != 1:
            raise LoadError(
                f"{group.target}: the conversion {conv.source_patterns} leaves {len(value)} tensors, not one"
            )
        value = value[0]
    return value


def _stack(items: list[Item] | Item, dim: int, target: str) -> Item:
    if not isinstance(items, list):
        return items  # already one tensor: transformers passes it through
    _common([(p[0][0], shape) for shape, p in items], None, target)
    shape = list(items[0][0])
    d = dim if dim >= 0 else len(shape) + 1 + dim
    shape.insert(d, len(items))
    pieces = [
        (key, region[:d] + (slice(i, i + 1),) + region[d:]) for i, (_, ps) in enumerate(items) for key, region in ps
    ]
    return tuple(shape), pieces


def _cat(items: list[Item], dim: int, target: str) -> Item:
    if not items:
        raise LoadError(f"{target}: nothing to concatenate")
    d = dim % len(items[0][0])
    _common([(p[0][0], shape) for shape, p in items], d, target)
    shape = list(items[0][0])
    shape[d] = sum(s[d] for s, _ in items)
    pieces, offset = [], 0
    for s, ps in items:
        for key, region in ps:
            r = region[d]
            pieces.append((key, region[:d] + (slice(r.start + offset, r.stop + offset),) + region[d + 1 :]))
        offset += s[d]
    return tuple(shape), pieces


def _common(items: list[tuple[str, Shape]], free_dim: int | None, target: str) -> None:
    """All shapes equal (but along `free_dim`); else a LoadError naming the odd parts by their checkpoint names."""

    def norm(s: Shape) -> Shape:
        return tuple(n for i, n in enumerate(s) if i != free_dim) + (len(s),)

    counts: dict[Shape, int] = {}
    for _, s in items:
        counts[norm(s)] = counts.get(norm(s), 0) + 1
    usual = max(counts, key=counts.__getitem__)
    odd = [f"{k} {list(s)}" for k, s in items if norm(s) != usual]
    if odd:
        want = next(s for _, s in items if norm(s) == usual)
        raise LoadError(f"{target}: part(s) with the wrong shape: {', '.join(odd)}; the other parts have {list(want)}")


def _composite_reader(
    group: _Group, source: Mapping[str, SourceTensor], layout: Item, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    """Read the parts (only when called) straight into their regions of one preallocated tensor: host RAM peaks
    at the fused tensor plus one part."""
    shape, pieces = layout

    def read() -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        for key, region in pieces:
            part = source[key].read()
            view = out[region]
            view.copy_(part.reshape(view.shape))
            del part
        return out

    return read


def _renamings(model: nn.Module) -> tuple[list[Any], Any] | None:
    found = _mapping(model)
    return None if found is None or not found[0] else (found[0], found[2])


def renamed_index(model: nn.Module, index: CheckpointIndex) -> CheckpointIndex:
    """`index` with every key renamed by transformers' renamings for `model` (GPT-NeoX `embed_out.` → `lm_head.`),
    suffixes kept (`embed_out.weight.absmax` → `lm_head.weight.absmax`): the bitsandbytes layout's per-layer
    tensors follow their weight's rename, as transformers does on load. Fusions are not applied (bitsandbytes
    checkpoints hold no fused expert stacks). A rename onto a name the checkpoint already has is refused."""
    found = _renamings(model)
    if found is None:
        return index
    renamings, cml = found
    out: dict[str, TensorInfo] = {}
    for key, info in index.tensors.items():
        new, _ = cml.rename_source_key(key, copy.deepcopy(renamings), [])
        if new in out:
            raise LoadError(
                f"checkpoint tensors {out[new].name!r} and {key!r} both become {new!r} under "
                "transformers' renames: the checkpoint holds the same tensor twice; remove one"
            )
        out[new] = info
    return CheckpointIndex(index.path, out, index.files, index.metadata)


def reverse_renamed(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (a state dict in the model's names) under the names transformers writes on save: its renamings
    reversed (`lm_head.` → `embed_out.` for GPT-NeoX), as `save_pretrained` does (`revert_weight_conversion`)."""
    found = _renamings(model)
    if found is None:
        return dict(tensors)
    renamings, cml = found
    reverse = [r.reverse_transform() for r in renamings[::-1]]
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        new, _ = cml.rename_source_key(key, copy.deepcopy(reverse), [])
        out[new] = t
    return out
