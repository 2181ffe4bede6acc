"""Quantized drop-in replacements for `nn.Linear` (and transformers' `Conv1D`), and the functions that convert a
model to and from them.

Every tensor lives in a registered buffer (or the bias parameter), so `.to()`, `state_dict()` and the
offload stores move them generically; metadata (shapes, blocksize, quant type, compute dtype, threshold)
are plain attributes. Forwards go through the `shardq::*` ops (`shardq.kernels.ops.call`: straight to the CUDA kernel in
eager mode on a GPU, the op itself otherwise), so CUDA kernels take over on a GPU.
The loader builds empty modules on the meta device (`empty`) and fills them with `load_from_float`,
which quantizes on the device the float weight is on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import shardq.kernels.ops  # registers torch.ops.shardq
from shardq.config import NESTED_BLOCKSIZE, QuantConfig
from shardq.formats import blockwise, codebooks
from shardq.quant import sizing

PROGRESS_MIN_LAYERS = 32  # show a progress bar when converting or loading at least this many layers


def _bias_param(out_features: int, bias: bool, device, dtype) -> nn.Parameter | None:
    if not bias:
        return None
    return nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)


def _set_bias(module: nn.Module, bias: torch.Tensor | None) -> None:
    if (bias is None) != (module.bias is None):
        raise ValueError(
            f"bias {'given' if bias is not None else 'missing'} but the layer was built "
            f"{'with' if module.bias is not None else 'without'} one: pass bias= to match"
        )
    if bias is not None:
        if tuple(bias.shape) != (module.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({module.out_features},)")
        module.bias = nn.Parameter(bias.detach().to(module.dtype), requires_grad=False)


def _check_weight(module: nn.Module, weight: torch.Tensor) -> None:
    want = (module.out_features, module.in_features)
    if tuple(weight.shape) != want:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {want} (out_features, in_features)")
    if not weight.is_floating_point():
        raise ValueError(f"weight has dtype {weight.dtype}: give a float weight to quantize")
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device: load real values before quantizing")


def _matmul(name: str, bias: torch.Tensor | None, *args) -> torch.Tensor:
    """Run op `name` through `ops.call`, or through the op itself when the bias is trained (PEFT's `bias="all"`):
    `ops.call` skips the dispatcher, hence autograd, whenever x needs no gradient, which would drop the bias's."""
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        return getattr(torch.ops.shardq, name)(*args)
    return shardq.kernels.ops.call(name, *args)


class _Quantized(nn.Module):
    """What both layers share: the constructors, and `.half()`/`.to(dtype)` casting the bias but never the
    stored formats."""

    def _apply(self, fn, recurse=True):
        before = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, new in list(self._buffers.items()):
            old = before.get(name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # move only: quantized data keep their dtype
        return self

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        cfg: QuantConfig,
        device: torch.device | str = "meta",
        dtype: torch.dtype = torch.float16,
    ) -> _Quantized:
        """An unfilled layer (meta by default) for the loader; fill with `load_from_float` or `load_quantized`."""
        return cls(in_features, out_features, bias, cfg, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, cfg: QuantConfig) -> _Quantized:
        """Quantize an `nn.Linear` (or subclass) or a transformers `Conv1D` on the device its weight is on; a
        Conv1D's [in, out] weight is transposed first, so the layer computes the same `x @ W + b`."""
        shape = sizing.linear_shape(linear)
        if shape is None:
            raise TypeError(f"{type(linear).__name__} is not an nn.Linear or transformers Conv1D: nothing to quantize")
        weight = sizing.linear_weight(linear)
        m = cls.empty(shape[1], shape[0], linear.bias is not None, cfg, "meta", weight.dtype)
        return m.load_from_float(weight, None if linear.bias is None else linear.bias.detach())

    def set_quantized(self, state: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        """Adopt already-quantized tensors (named as this layer's buffers) after checking shape and dtype."""
        for name, value in state.items():
            cur = getattr(self, name)
            if tuple(value.shape) != tuple(cur.shape) or value.dtype != cur.dtype:
                raise ValueError(
                    f"{name}: got {value.dtype} {tuple(value.shape)}, this layer stores {cur.dtype} {tuple(cur.shape)}"
                )
            setattr(self, name, value)
        _set_bias(self, bias)


class Linear4bit(_Quantized):
    """NF4/FP4 blockwise-quantized linear layer (bitsandbytes layout, optional double quant)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        cfg: QuantConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        cfg = QuantConfig(method="nf4") if cfg is None else cfg
        if not cfg.is_4bit:
            raise ValueError(f"Linear4bit needs a 4-bit QuantConfig (nf4 or fp4), got method={cfg.method!r}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = cfg.method, cfg.blocksize, cfg.double_quant
        self.compute_dtype, self.dtype = cfg.compute_dtype, dtype
        numel = in_features * out_features
        nb = blockwise.n_blocks(numel, cfg.blocksize)
        self.register_buffer("weight", torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device))
        self.register_buffer(
            "absmax", torch.empty(nb, device=device, dtype=torch.uint8 if cfg.double_quant else torch.float32)
        )
        self.register_buffer("quant_map", torch.empty(16, dtype=torch.float32, device=device))
        if cfg.double_quant:
            self.register_buffer("nested_absmax", torch.empty(-(-nb // NESTED_BLOCKSIZE), device=device))
            self.register_buffer("nested_quant_map", torch.empty(256, dtype=torch.float32, device=device))
            self.register_buffer("nested_offset", torch.empty((), dtype=torch.float32, device=device))
        self._offset: float | None = None
        self.bias = _bias_param(out_features, bias, device, dtype)

    def load_from_float(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear4bit:
        """Quantize a float [out, in] weight on its own device into this layer's buffers; returns self."""
        _check_weight(self, weight)
        dev = weight.device
        code = codebooks.code_4bit(self.quant_type, dev)
        packed, absmax = torch.ops.shardq.quantize_4bit(weight.contiguous(), code, self.blocksize)
        self.dtype = weight.dtype
        state = {"weight": packed, "quant_map": code}
        if self.double_quant:
            nested = blockwise.quantize_absmax(absmax, codebooks.dynamic_map(dev))
            state.update(
                absmax=nested.q,
                nested_absmax=nested.nested_absmax,
                nested_quant_map=nested.code,
                nested_offset=nested.offset.reshape(()),
            )
        else:
            state["absmax"] = absmax
        self.set_quantized(state, bias)
        return self

    def set_quantized(self, state: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        super().set_quantized(state, bias)
        self._offset = float(self.nested_offset) if self.double_quant else None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._offset = None

    def offset_value(self) -> float:
        """The double-quant offset as a Python float (cached so forwards need no device sync)."""
        if self._offset is None:
            self._offset = float(self.nested_offset)
        return self._offset

    def real_absmax(self) -> torch.Tensor:
        """fp32 absmax per block (double quant undone)."""
        if not self.double_quant:
            return self.absmax
        return blockwise.dequantize_absmax(self.absmax, self.nested_absmax, self.nested_quant_map, self.offset_value())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        xc = x.to(self.compute_dtype) if self.compute_dtype is not None else x
        dq = self.double_quant
        out = _matmul(
            "gemm_4bit",
            self.bias,
            xc,
            self.weight,
            self.absmax,
            self.quant_map,
            self.blocksize,
            self.out_features,
            self.in_features,
            self.nested_absmax if dq else None,
            self.nested_quant_map if dq else None,
            self.offset_value() if dq else 0.0,
            self.bias,
        )
        return out.to(inp_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.ops.shardq.dequantize_4bit(
            self.weight,
            self.real_absmax(),
            self.quant_map,
            self.blocksize,
            [self.out_features, self.in_features],
            dtype or self.dtype,
        )

    def dequantize(self) -> nn.Linear:
        """An `nn.Linear` (original dtype) holding the dequantized weight."""
        return _float_linear(self, self.dequantized_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )


class Linear8bit(_Quantized):
    """LLM.int8() linear layer: int8 weight with per-row absmax `SCB`, outlier columns in the compute dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        cfg: QuantConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        cfg = QuantConfig(method="int8") if cfg is None else cfg
        if cfg.method != "int8":
            raise ValueError(f"Linear8bit needs an int8 QuantConfig, got method={cfg.method!r}")
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.compute_dtype, self.dtype = float(cfg.threshold), cfg.compute_dtype, dtype
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = _bias_param(out_features, bias, device, dtype)

    def load_from_float(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear8bit:
        """Quantize a float [out, in] weight row-wise on its own device into this layer's buffers; returns self."""
        _check_weight(self, weight)
        q, scb = torch.ops.shardq.quantize_int8_rowwise(weight.contiguous())
        self.dtype = weight.dtype
        self.set_quantized({"weight": q, "SCB": scb}, bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        xc = x.to(self.compute_dtype) if self.compute_dtype is not None else x
        out = _matmul("int8_linear", self.bias, xc, self.weight, self.SCB, self.bias, self.threshold)
        return out.to(inp_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * (self.SCB / 127.0).unsqueeze(1)).to(dtype or self.dtype)

    def dequantize(self) -> nn.Linear:
        """An `nn.Linear` (original dtype) holding the dequantized weight."""
        return _float_linear(self, self.dequantized_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}"
        )


QuantLinear = (Linear4bit, Linear8bit)


def _float_linear(m: nn.Module, weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    return lin


def empty_quantized(
    in_features: int,
    out_features: int,
    bias: bool,
    cfg: QuantConfig,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float16,
) -> nn.Module:
    """An empty Linear4bit or Linear8bit for `cfg` (the loader's entry point)."""
    cls = Linear8bit if cfg.method == "int8" else Linear4bit
    return cls.empty(in_features, out_features, bias, cfg, device=device, dtype=dtype)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def memory_footprint(model: nn.Module) -> int:
    """Bytes really stored by the model's parameters and buffers (packed weights, absmax, nested statistics,
    code books, biases), each storage counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
        key = (str(t.device), ptr)
        if ptr:
            if key in seen:
                continue
            seen.add(key)
        total += t.numel() * t.element_size()
    return total


def quantized_bytes(module: nn.Module) -> int:
    """Bytes stored by one module's own tensors (no dedup), e.g. to compare with `shardq.quant.sizing`."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def expected_4bit_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """The DESIGN.md formula for a 4-bit weight as stored (without bias)."""
    nb = math.ceil(numel / blocksize)
    stats = nb + 4 * math.ceil(nb / NESTED_BLOCKSIZE) + 1024 + 4 if double_quant else 4 * nb
    return math.ceil(numel / 2) + stats + 64
