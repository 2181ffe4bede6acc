"""Quantization settings: shardq's own `QuantConfig`, and the mapping from transformers' `BitsAndBytesConfig`.

One frozen dataclass describes how blocks are stored; every other module reads it and never a raw dict,
so a contradictory setting is rejected once, here, before anything is planned or allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

METHODS = ("none", "int8", "nf4", "fp4")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
}
# bitsandbytes quantizes the absmax statistics of double quant in blocks of 256, as 8-bit dynamic codes.
NESTED_BLOCKSIZE = 256
# modules never quantized by default: the output head (bitsandbytes keeps it in full precision too)
DEFAULT_SKIP = ("lm_head",)


class QuantConfigError(ValueError):
    """A quantization setting that is invalid or contradicts another one."""


@dataclass(frozen=True)
class QuantConfig:
    """How linear weights are stored: `method` is "none", "int8" (LLM.int8()), "nf4" or "fp4".

    int8: `threshold` is the outlier magnitude above which an input feature column runs in the compute
    dtype (0 turns the decomposition off). 4-bit: `blocksize` elements share one absmax; `double_quant`
    stores those absmax values again as 8-bit codes in blocks of 256. `compute_dtype` is the dtype the
    matmul runs in (None: the input's). `skip_modules` names modules (by name or name component) kept in
    their own dtype; None means the default, the output head. `fp32_cpu_offload` keeps modules placed
    on the CPU unquantized in fp32 and runs them there, as bitsandbytes' llm_int8_enable_fp32_cpu_offload.
    """

    method: str = "none"
    threshold: float = 6.0
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None
    skip_modules: tuple[str, ...] | None = None
    fp32_cpu_offload: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        if self.method not in METHODS:
            raise QuantConfigError(f"quantization method {self.method!r} is unknown: use one of {METHODS}")
        thr = self.threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or thr != thr or thr < 0:
            raise QuantConfigError(
                f"threshold={thr!r} is invalid: give a number >= 0 (0 turns outlier decomposition off)"
            )
        if self.blocksize not in BLOCKSIZES_4BIT:
            raise QuantConfigError(f"blocksize={self.blocksize!r} is unsupported: use one of {BLOCKSIZES_4BIT}")
        if self.double_quant and self.method not in ("nf4", "fp4"):
            raise QuantConfigError(f"double_quant=True needs a 4-bit method (nf4 or fp4), not {self.method!r}")
        if self.compute_dtype is not None and self.compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise QuantConfigError(
                f"compute_dtype={self.compute_dtype!r} is unsupported: use float16, bfloat16 or float32"
            )
        if self.skip_modules is not None:
            object.__setattr__(self, "skip_modules", tuple(self.skip_modules))

    def _check_types(self) -> None:
        """Every field's type, before its value: a float blocksize or a string flag would pass the value checks and
        fail later, after planning."""
        if not isinstance(self.method, str):
            raise QuantConfigError(f"method={self.method!r} must be a string: one of {METHODS}")
        if type(self.blocksize) is not int:
            raise QuantConfigError(f"blocksize={self.blocksize!r} must be an int: one of {BLOCKSIZES_4BIT}")
        for name in ("double_quant", "fp32_cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise QuantConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.compute_dtype is not None and not isinstance(self.compute_dtype, torch.dtype):
            raise QuantConfigError(
                f"compute_dtype={self.compute_dtype!r} must be a torch dtype (torch.float16, torch.bfloat16, "
                "torch.float32) or None"
            )
        skip = self.skip_modules
        if skip is not None and (isinstance(skip, str) or not all(isinstance(n, str) for n in skip)):
            raise QuantConfigError(f"skip_modules={skip!r} must be a list of module names, e.g. ['lm_head']")

    @property
    def bits(self) -> int:
        return {"none": 16, "int8": 8, "nf4": 4, "fp4": 4}[self.method]

    @property
    def is_4bit(self) -> bool:
        return self.method in ("nf4", "fp4")

    @property
    def skip(self) -> tuple[str, ...]:
        """Modules kept unquantized: the user's list, or the default output head."""
        return DEFAULT_SKIP if self.skip_modules is None else self.skip_modules

    def skips(self, module_name: str) -> bool:
        """True if `module_name` matches a skip entry exactly, as a dotted component, or as a prefix."""
        parts = module_name.split(".")
        for s in self.skip:
            if module_name == s or module_name.startswith(s + ".") or s in parts or module_name.endswith("." + s):
                return True
        return False

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_any(cls, obj: Any) -> QuantConfig:
        """Accept None, a method name ("int8", "8bit", "nf4", "fp4", "none"), a QuantConfig, a transformers
        `BitsAndBytesConfig` (as is) or its `to_dict()` form."""
        if obj is None:
            return cls()
        if isinstance(obj, QuantConfig):
            return obj
        if isinstance(obj, str):
            return cls(method=_method_from_name(obj))
        if hasattr(obj, "to_dict") and type(obj).__name__ == "BitsAndBytesConfig":
            return from_bnb_dict(obj.to_dict())
        if isinstance(obj, Mapping):
            keys = set(obj)
            if keys & _BNB_KEYS:
                return from_bnb_dict(obj)
            unknown = keys - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise QuantConfigError(
                    f"unknown quantization field(s) {sorted(unknown)}: QuantConfig takes "
                    f"{[f.name for f in dataclasses.fields(cls)]} or BitsAndBytesConfig fields"
                )
            kw = dict(obj)
            if "compute_dtype" in kw:
                kw["compute_dtype"] = parse_dtype(kw["compute_dtype"], "compute_dtype")
            return cls(**kw)
        raise QuantConfigError(
            f"cannot read a quantization config from {type(obj).__name__}: give a QuantConfig, "
            "a BitsAndBytesConfig, its dict, or one of 'none', 'int8', 'nf4', 'fp4'"
        )


_BNB_KEYS = {
    "load_in_8bit",
    "load_in_4bit",
    "_load_in_8bit",
    "_load_in_4bit",
    "llm_int8_threshold",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "quant_method",
}


def _method_from_name(name: str) -> str:
    n = name.strip().lower().replace("-", "").replace("_", "")
    table = {
        "none": "none",
        "fp16": "none",
        "bf16": "none",
        "int8": "int8",
        "8bit": "int8",
        "llmint8": "int8",
        "nf4": "nf4",
        "fp4": "fp4",
        "4bit": "nf4",
    }
    if n not in table:
        raise QuantConfigError(f"quantization {name!r} is unknown: use one of 'none', 'int8', 'nf4', 'fp4'")
    return table[n]


def parse_dtype(value: Any, field: str) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("float16", "torch.bfloat16", "bf16")."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in COMPUTE_DTYPES:
            return COMPUTE_DTYPES[key]
    raise QuantConfigError(f"{field}={value!r} is not a dtype: use float16, bfloat16 or float32")


def from_bnb_dict(d: Mapping[str, Any]) -> QuantConfig:
    """Map every field of a transformers BitsAndBytesConfig dict onto a QuantConfig."""
    method = d.get("quant_method", "bitsandbytes")
    if str(getattr(method, "value", method)) != "bitsandbytes":
        raise QuantConfigError(f"quant_method={method!r} is not bitsandbytes: shardq reads bitsandbytes configs only")
    in8 = bool(d.get("load_in_8bit", d.get("_load_in_8bit", False)))
    in4 = bool(d.get("load_in_4bit", d.get("_load_in_4bit", False)))
    if in8 and in4:
        raise QuantConfigError("load_in_8bit and load_in_4bit are both True: choose one")
    if d.get("llm_int8_has_fp16_weight"):
        raise QuantConfigError(
            "llm_int8_has_fp16_weight=True (fp16 master weights for training) is unsupported: "
            "shardq stores int8 weights for inference; set it to False"
        )
    storage = str(d.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")
    if storage != "uint8":
        raise QuantConfigError(f"bnb_4bit_quant_storage={storage!r} is unsupported: use uint8")
    qtype = str(d.get("bnb_4bit_quant_type", "fp4")).lower()
    if in4 and qtype not in ("nf4", "fp4"):
        raise QuantConfigError(f"bnb_4bit_quant_type={qtype!r} is unknown: use 'nf4' or 'fp4'")
    skip = d.get("llm_int8_skip_modules")
    try:
        return _bnb_to_config(d, in8, in4, qtype, skip)
    except QuantConfigError as exc:  # name the BitsAndBytesConfig field the user actually set
        msg = str(exc)
        for ours, theirs in _BNB_FIELD.items():
            if msg.startswith(ours + "="):
                msg = theirs + msg[len(ours) :]
        raise QuantConfigError(msg) from None


_BNB_FIELD = {
    "threshold": "llm_int8_threshold",
    "blocksize": "bnb_4bit_blocksize",
    "compute_dtype": "bnb_4bit_compute_dtype",
}


def _bnb_to_config(d: Mapping[str, Any], in8: bool, in4: bool, qtype: str, skip: Any) -> QuantConfig:
    return QuantConfig(
        method="int8" if in8 else (qtype if in4 else "none"),
        threshold=float(d.get("llm_int8_threshold", 6.0)),
        blocksize=int(d.get("bnb_4bit_blocksize", 64)),
        double_quant=bool(d.get("bnb_4bit_use_double_quant", False)) and in4,
        compute_dtype=parse_dtype(d.get("bnb_4bit_compute_dtype"), "bnb_4bit_compute_dtype") if in4 else None,
        skip_modules=tuple(skip) if skip is not None else None,
        fp32_cpu_offload=bool(d.get("llm_int8_enable_fp32_cpu_offload", False)),
    )


def to_bnb_dict(cfg: QuantConfig) -> dict[str, Any]:
    """The `quantization_config` entry transformers writes to config.json for this setting."""
    dtype = cfg.compute_dtype or torch.float32
    return {
        "quant_method": "bitsandbytes",
        "load_in_8bit": cfg.method == "int8",
        "load_in_4bit": cfg.is_4bit,
        "llm_int8_threshold": cfg.threshold,
        "llm_int8_skip_modules": list(cfg.skip_modules) if cfg.skip_modules is not None else None,
        "llm_int8_enable_fp32_cpu_offload": cfg.fp32_cpu_offload,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": cfg.method if cfg.is_4bit else "fp4",
        "bnb_4bit_use_double_quant": cfg.double_quant,
        "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
    }
