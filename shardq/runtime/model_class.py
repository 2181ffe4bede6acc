"""The class a dispatched transformers model runs as: `model.device` / `model.dtype` read from the dispatch runtime,
and the decode step of its static-cache `generate()` (`get_compiled_call`), which also decides how shardq's graphs
and torch.compile meet:

- no `compile_config`, or transformers' default `CompileConfig()`: shardq's `GraphDecoder` (`shardq.runtime.decode`);
- a `CompileConfig` other than the default (a backend, `fullgraph`, a mode, options...): the user asked for that
  torch.compile, so transformers compiles the dispatched model's call with it; `fullgraph=True` on a model whose
  blocks swap weights in per forward (streamed, disk, borrowed tied weights: one graph break each) is turned into
  `fullgraph=False` with a warning, as transformers does for flash attention;
- a model the user compiled itself (`model.compile()`, or `model.forward = torch.compile(model.forward)` after
  dispatch): its own compiled call runs each step (no graphs of shardq's captured around it);
- `set_graph_decode(model, False)`: transformers' torch.compile, the config checked as above.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import torch
from torch import nn

from shardq.runtime import fast_decode
from shardq.runtime.decode import decoder_of


def expose_main_device(model: nn.Module, rt: Any) -> None:
    """Make `model.device` the main device (where outputs come back) and `model.dtype` the dtype before dispatch.

    transformers' `model.device`/`model.dtype` read the first parameter: with the first block offloaded (an
    embedding computed on the CPU in fp32) they would say CPU/fp32, and `generate()` would warn about inputs on
    the GPU and route them through the CPU. These are class properties, so the instance's class is swapped for
    a subclass with the same name that overrides both (what `torch.nn.utils.parametrize` does to parametrized
    modules); `remove_dispatch` restores the class. Models without a `device` property are left alone.
    """
    cls: type = type(model)  # as `type`: mypy does not see a `type[Any]` as Hashable (the cache's key)
    if not isinstance(getattr(cls, "device", None), property):
        return
    rt.model_class = cls
    model.__class__ = _dispatched_class(cls)


def asks_compile(compile_config: Any) -> bool:
    """Whether a `CompileConfig` differs from transformers' default: the user asked for a particular compile."""
    return compile_config is not None and compile_config != type(compile_config)()


def user_compiled(model: nn.Module) -> bool:
    """Whether the user compiled the model's own call after dispatch: `model.compile()`, or `model.forward`
    replaced by a torch.compile'd function (`model.forward = torch.compile(model.forward)`)."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        return True
    return hasattr(model.__dict__.get("forward"), "_torchdynamo_orig_callable")  # what torch.compile(fn) returns


def graph_breaks(rt: Any) -> list[str]:
    """Blocks whose forward breaks a torch.compile graph: those that swap weights in (streamed, disk, borrowing)."""
    return [b.name for b in rt.blocks.values() if b.streamed or b.borrowed]


def fit_config(rt: Any, compile_config: Any) -> Any:
    """`compile_config` for this model: `fullgraph=True` turned off, with a warning, when a block breaks graphs."""
    breaking = graph_breaks(rt)
    if compile_config is None or not compile_config.fullgraph or not breaking:
        return compile_config
    warnings.warn(
        f"CompileConfig(fullgraph=True) cannot hold this dispatched model: blocks {breaking[:4]} swap their weights "
        "in per forward (streamed, disk or borrowed tied weights), a graph break each; compiling with "
        "fullgraph=False",
        UserWarning,
        stacklevel=4,
    )
    return dataclasses.replace(compile_config, fullgraph=False)


def _decode_call(model: nn.Module, compile_config: Any, compile_call: Any) -> Any:
    """The callable of one static-cache decode step (the policy of the module docstring)."""
    rt = model.__dict__["shardq_runtime"]
    if not rt.graph_decode or asks_compile(compile_config):
        return compile_call(fit_config(rt, compile_config))
    if user_compiled(model):
        return model.__call__
    return decoder_of(model)


@functools.cache
def _dispatched_class(cls: type[Any]) -> type:
    """`cls` with `device` and `dtype` read from the dispatch runtime (one subclass per class, same names)."""
    base_device = cls.device
    base_dtype: Any = getattr(cls, "dtype", None)  # a property whenever the `dtype` override below is installed

    def device(self: nn.Module) -> torch.device:
        rt = self.__dict__.get("shardq_runtime")
        return rt.main_device if rt is not None else base_device.fget(self)

    def dtype(self: nn.Module) -> torch.dtype:
        rt = self.__dict__.get("shardq_runtime")
        if rt is not None and rt.model_dtype is not None:
            return rt.model_dtype
        return base_dtype.fget(self)

    def get_compiled_call(self: nn.Module, compile_config: Any = None) -> Any:
        """The decode step transformers' static-cache generate() runs (see `shardq.runtime.model_class`)."""
        parent = super(new, self).get_compiled_call
        if "shardq_runtime" not in self.__dict__:
            return parent(compile_config)
        return _decode_call(self, compile_config, parent)

    def generate(self: nn.Module, inputs: Any = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """transformers' generate(), or the static graph loop (`shardq.runtime.fast_decode`) for the requests it
        serves exactly when graph decode is on, the cache is static and no torch.compile was asked for."""
        config = generation_config if generation_config is not None else getattr(self, "generation_config", None)
        asked = kwargs.get("compile_config", getattr(config, "compile_config", None))
        if not (asks_compile(asked) or user_compiled(self)):
            out = fast_decode.try_fast_generate(self, inputs, generation_config, kwargs)
            if out is not None:
                return out
        return super(new, self).generate(inputs, generation_config, **kwargs)

    ns: dict[str, Any] = {
        "device": property(device, doc="The device where the dispatched model's outputs come back."),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    if hasattr(cls, "get_compiled_call"):
        ns["get_compiled_call"] = get_compiled_call
    if hasattr(cls, "generate") and hasattr(cls, "prepare_inputs_for_generation"):
        ns["generate"] = generate
    if isinstance(base_dtype, property):
        ns["dtype"] = property(dtype, doc="The model's floating dtype before dispatch.")
    new: type[Any] = type(cls.__name__, (cls,), ns)
    return new
