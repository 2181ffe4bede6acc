"""torch.compile (inductor) on dispatched models on a GPU: a model resident on GPU 0 (fp16, nf4, int8: shardq's
CUDA kernels through the `shardq::*` ops) compiles fullgraph to the eager logits, `mode="reduce-overhead"` replays
it from CUDA graphs, a model with CPU-streamed blocks compiles with graph breaks, and transformers' compiled decode
(`CompileConfig`) on both. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from test_decode import GEN, tiny_lm
from test_dispatch import blocks
from transformers import CompileConfig

from shardq.runtime.dispatch import dispatch_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = dict(atol=2e-2, rtol=2e-2)  # fp16 logits: inductor fuses and reorders sums


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    from shardq.runtime import fast_decode

    monkeypatch.setattr(fast_decode, "ENABLED", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 200, (batch, 5), generator=torch.Generator().manual_seed(seed)).cuda()


def _resident(kind: str, tmp_path) -> torch.nn.Module:
    """A tiny Llama on GPU 0: fp16 dispatched, or loaded nf4/int8 under a cap that holds it all."""
    if kind == "fp16":
        model = tiny_lm("llama").half()
        return dispatch_model(model, {n: 0 for n in blocks(model)})
    from shardq.loading.loader import load_sharded

    tiny_lm("llama").half().save_pretrained(tmp_path)
    return load_sharded(tiny_lm("llama").half(), tmp_path, max_memory={0: "2GB"}, quant=kind, progress=False)


def _streamed(dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    model = tiny_lm("llama").to(dtype)
    layers = [n for n in blocks(model) if ".layers." in n]
    dmap = {n: "cpu" if n in layers[1:3] else 0 for n in blocks(model)}
    return dispatch_model(model, dmap, offload_modes="stream")


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.clone()  # reduce-overhead outputs are overwritten by the next replay


@pytest.mark.parametrize("kind", ["fp16", "nf4", "int8"])
def test_resident_inductor_fullgraph_equals_eager(kind, tmp_path):
    model = _resident(kind, tmp_path)
    assert set(model.shardq_offload_modes.values()) == {"gpu"}
    assert not any("forward" in m.__dict__ for m in model.modules() if m is not model)  # no block wrappers
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(input_ids=_ids())
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    for seed in (1, 2):
        torch.testing.assert_close(_logits(compiled, _ids(seed=seed)), _logits(model, _ids(seed=seed)), **TOL)


@pytest.mark.parametrize("kind", ["fp16", "nf4"])
def test_reduce_overhead_replays_cuda_graphs(kind, tmp_path):
    model = _resident(kind, tmp_path)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    want = [_logits(model, _ids(seed=s)) for s in (1, 2, 3, 4)]
    got = [_logits(compiled, _ids(seed=s)) for s in (1, 2, 3, 4)]  # warm-up, record, then replays
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_streamed_model_compiles_with_graph_breaks():
    model = _streamed()
    compiled = torch.compile(model, backend="inductor")
    for seed in (1, 2, 1):
        torch.testing.assert_close(_logits(compiled, _ids(seed=seed)), _logits(model, _ids(seed=seed)), **TOL)
    assert model.shardq_runtime.streamer.stats["prefetched"] > 0


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_transformers_compile_config_on_gpu(streamed):
    """fp32 (no TF32) so greedy tokens match the eager model's exactly; fullgraph=True is dropped, with a
    warning, where blocks stream."""
    model = _streamed(torch.float32) if streamed else tiny_lm("llama")
    if not streamed:
        dispatch_model(model, {n: 0 for n in blocks(model)})
    ref = tiny_lm("llama").cuda()
    kw = dict(cache_implementation="static", **GEN)
    want = ref.generate(_ids(), disable_compile=True, **kw)
    cc = CompileConfig(backend="inductor", mode="default", fullgraph=True)
    if streamed:
        with pytest.warns(UserWarning, match="fullgraph=False"):
            got = model.generate(_ids(), compile_config=cc, **kw)
    else:
        got = model.generate(_ids(), compile_config=cc, **kw)
    assert torch.equal(got, want) and model.shardq_runtime.decoder is None


def test_user_compiled_model_serves_static_generate():
    """After model.compile(mode="reduce-overhead") the static-cache steps run the user's compiled call (inductor's
    CUDA graphs), not shardq's graph decoder around it."""
    model = tiny_lm("llama")
    dispatch_model(model, {n: 0 for n in blocks(model)})
    ref = tiny_lm("llama").cuda()
    kw = dict(cache_implementation="static", **GEN)
    want = ref.generate(_ids(), disable_compile=True, **kw)
    model.compile(mode="reduce-overhead")
    assert torch.equal(model.generate(_ids(), **kw), want)
    assert model.shardq_runtime.decoder is None
