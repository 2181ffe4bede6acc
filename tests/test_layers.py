"""The package's shape: imports flow one way (no cycles), down the layers of DESIGN.md, and the public API stays."""

from __future__ import annotations

import ast
from pathlib import Path

import shardq

ROOT = Path(shardq.__file__).parent
# Lower layers never import higher ones: base < formats, checkpoint < kernels < quant < planning < runtime < loading
# < entry points. Modules of one layer may import each other (without cycles).
LAYERS = {
    "shardq.config": 0, "shardq.memory": 0, "shardq.progress": 0, "shardq.hf": 0,
    "shardq.formats": 1, "shardq.checkpoint": 1,
    "shardq.kernels": 2,
    "shardq.quant": 3,
    "shardq.planning": 4,
    "shardq.runtime": 5,
    "shardq.loading": 6, "shardq.training": 6,
    "shardq.distributed": 7,
    "shardq.cli": 8, "shardq.demo": 8, "shardq.__main__": 8, "shardq": 8,
}
PUBLIC = ["Linear4bit", "Linear8bit", "Plan", "QuantConfig", "__version__", "dequantize_model", "dispatch_model",
          "get_max_memory", "load_quantized", "load_sharded", "load_sharded_from_dir", "memory_footprint",
          "meta_model_from_dir", "parse_size", "plan", "plan_model", "quantize_model", "save_quantized"]


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _edges() -> dict[str, set[str]]:
    """Module -> shardq modules it imports (at any depth, lazy imports included)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                    else (node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t.startswith("shardq"):
                    edges[m].add(t)
    return edges


def _layer(mod: str) -> int:
    while mod not in LAYERS:
        mod = mod.rpartition(".")[0]
    return LAYERS[mod]


def test_no_import_cycles():
    edges = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_imports_flow_down_the_layers():
    bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, ts in _edges().items() for t in ts if _layer(t) > _layer(m)]
    assert not bad, "\n".join(sorted(bad))


def test_every_module_has_a_layer():
    for m in _modules():
        _layer(m)


def test_public_api_is_pinned():
    assert sorted(shardq.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(shardq, name) is not None
    assert callable(shardq.plan) and callable(shardq.load_sharded) and isinstance(shardq.QuantConfig, type)
