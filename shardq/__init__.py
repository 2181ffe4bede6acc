"""shardq: run models that do not fit on your GPUs.

Plans a device map under `max_memory` caps, quantizes blocks to 8 or 4 bits as they stream in from
safetensors, and runs the forward across GPUs, CPU and disk. Names are imported lazily so that
`import shardq` stays cheap and never touches a GPU.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "QuantConfig": "shardq.config",
    "parse_size": "shardq.memory",
    "get_max_memory": "shardq.memory",
    "Plan": "shardq.planning.planner",
    "plan": "shardq.planning.planner",
    "plan_model": "shardq.planning.planner",
    "Linear8bit": "shardq.quant.linear",
    "Linear4bit": "shardq.quant.linear",
    "quantize_model": "shardq.quant.convert",
    "dequantize_model": "shardq.quant.convert",
    "memory_footprint": "shardq.quant.linear",
    "save_quantized": "shardq.quant.serialize",
    "load_quantized": "shardq.quant.serialize",
    "dispatch_model": "shardq.runtime.dispatch",
    "load_sharded": "shardq.loading.loader",
    "load_sharded_from_dir": "shardq.loading.loader",
    "meta_model_from_dir": "shardq.hf",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shardq' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
