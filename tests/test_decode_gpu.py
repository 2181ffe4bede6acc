"""Graph decode on a GPU: CUDA-graph replayed static-cache generate() against eager generate() (greedy, same dtype),
fully resident, with CPU-streamed and with CPU-run blocks, sampling with a fixed seed, re-capture on a new batch
size, and the allocator peak under the plan's cap. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from test_decode import ARCHS, GEN, tiny_lm
from test_dispatch import blocks

from shardq.runtime.dispatch import dispatch_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def per_step_decoder(monkeypatch):
    """generate() through transformers' loop and the GraphDecoder; the fast loop's tests turn it back on."""
    from shardq.runtime import fast_decode

    monkeypatch.setattr(fast_decode, "ENABLED", False)


@pytest.fixture
def fast_loop(monkeypatch):
    from shardq.runtime import fast_decode

    monkeypatch.setattr(fast_decode, "ENABLED", True)


def _pair(arch: str, dmap_of, **kw):
    model = tiny_lm(arch).half()
    ref = copy.deepcopy(model).cuda()
    dispatch_model(model, dmap_of(blocks(model)), **kw)
    return model, ref


def _ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 200, (batch, 5), generator=torch.Generator().manual_seed(seed)).cuda()


def _check(model, ref, ids, **kw):
    want = ref.generate(ids, cache_implementation="static", disable_compile=True, **GEN, **kw)
    got = model.generate(ids, cache_implementation="static", **GEN, **kw)
    assert torch.equal(got, want)
    return model.shardq_runtime.decoder


@pytest.mark.parametrize("arch", ARCHS)
def test_resident_whole_step_graph(arch):
    model, ref = _pair(arch, lambda names: {n: 0 for n in names})
    assert not any("forward" in m.__dict__ for m in model.modules() if m is not model)  # no block wrappers
    dec = _check(model, ref, _ids())
    assert dec.whole_device == torch.device("cuda", 0) and dec.graph_count() == 1 and dec.stats["replays"] > 0
    _check(model, ref, _ids(seed=2))  # a new generate(): its cache is adopted
    assert dec.stats["captures"] == 1 and dec.stats["adopted"] >= 1


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_streamed_blocks_stay_eager_between_graphs(arch):
    def dmap(names):
        layers = [n for n in names if ".layers." in n]
        return {n: "cpu" if n in layers[1:3] else 0 for n in names}

    model, ref = _pair(arch, dmap, offload_modes="stream")
    streamed = [n for n, v in model.shardq_device_map.items() if v == "cpu"]
    dec = _check(model, ref, _ids())
    step = next(iter(dec.steps.values()))
    assert [r.name for r in step.recs if r.run is None] == streamed and dec.graph_count() >= 2
    assert model.shardq_runtime.streamer.stats["prefetched"] > 0


def test_cpu_run_block_among_graphs():
    model, _ = _pair(
        "llama",
        lambda names: {**{n: 0 for n in names}, "model.layers.1": "cpu"},
        offload_modes={"model.layers.1": "cpu"},
    )
    kw = dict(cache_implementation="static", **GEN)
    want = model.generate(_ids(), disable_compile=True, **kw)  # the same model eager (its CPU layer in fp32)
    got = model.generate(_ids(), **kw)
    assert torch.equal(got, want) and model.shardq_runtime.decoder.stats["replays"] > 0
    step = next(iter(model.shardq_runtime.decoder.steps.values()))
    assert [r.name for r in step.recs if r.run is None] == ["model.layers.1"]


def test_sampling_with_fixed_seed_equals_eager():
    model, ref = _pair("qwen2", lambda names: {n: 0 for n in names})
    kw = dict(cache_implementation="static", do_sample=True, top_k=20, top_p=0.9, max_new_tokens=8, pad_token_id=0)
    torch.manual_seed(7)
    want = ref.generate(_ids(), disable_compile=True, **kw)
    torch.manual_seed(7)
    got = model.generate(_ids(), **kw)
    assert torch.equal(got, want)


def test_new_batch_size_recaptures():
    model, ref = _pair("llama", lambda names: {n: 0 for n in names})
    _check(model, ref, _ids(2))
    dec = _check(model, ref, _ids(3))
    assert dec.stats["captures"] == 2 and dec.graph_count() == 2


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_graph_tokens_equal_eager(quant, tmp_path):
    """Quantized layers (shardq's CUDA kernels; LLM.int8() picks its outlier columns on the device, into buffers
    of static size) replayed from a graph, against the same model decoding eagerly."""
    from shardq.loading.loader import load_sharded

    model = tiny_lm("llama").half()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, ::7] *= 30  # outlier columns past the int8 threshold
    model.save_pretrained(tmp_path)
    a = load_sharded(tiny_lm("llama").half(), tmp_path, max_memory={0: "2GB"}, quant=quant, progress=False)
    kw = dict(cache_implementation="static", **GEN)
    want = a.generate(_ids(), disable_compile=True, **kw)
    got = a.generate(_ids(), **kw)
    assert torch.equal(got, want) and a.shardq_runtime.decoder.stats["replays"] > 0


def test_graph_pool_within_max_memory(tmp_path):
    """The decode graphs' memory stays within the cap: the planner's activation reserve (workload 1 x 512) covers a
    one-token step's pool and a short static cache."""
    from shardq.loading.loader import load_sharded

    model = tiny_lm("llama").half()
    model.save_pretrained(tmp_path)
    cap = 64 * 2**20
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(0)
    a = load_sharded(tiny_lm("llama").half(), tmp_path, max_memory={0: cap}, progress=False)
    torch.cuda.reset_peak_memory_stats(0)
    a.generate(_ids(), cache_implementation="static", **GEN)
    assert a.shardq_runtime.decoder.stats["replays"] > 0
    assert torch.cuda.max_memory_allocated(0) - base <= cap


# ---------------------------------------------------------------------------------------------------------------
# the static graph loop (shardq.runtime.fast_decode)


def _fast_pair(quant, tmp_path):
    from shardq.loading.loader import load_sharded

    model = tiny_lm("llama").half()
    model.save_pretrained(tmp_path)
    fast = load_sharded(tiny_lm("llama").half(), tmp_path, max_memory={0: "2GB"}, quant=quant, progress=False)
    eager = load_sharded(tiny_lm("llama").half(), tmp_path, max_memory={0: "2GB"}, quant=quant, progress=False)
    return fast, eager


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_fast_loop_tokens_equal_eager_and_replay_without_capture(quant, tmp_path, fast_loop):
    from shardq.runtime.fast_decode import fast_state

    fast, eager = _fast_pair(quant, tmp_path)
    ids = _ids()
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    want = eager.generate(ids, cache_implementation="static", disable_compile=True, **kw)
    got = fast.generate(ids, cache_implementation="static", **kw)
    stats = fast_state(fast).stats
    assert torch.equal(got, want) and stats["fast"] == 1 and stats["captures"] == 1 and stats["replays"] > 0
    again = fast.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(again, want) and stats["captures"] == 1 and stats["fast"] == 2


def test_fast_loop_sampling_reproducible(tmp_path, fast_loop):
    from shardq.runtime.fast_decode import fast_generate

    fast, _ = _fast_pair("nf4", tmp_path)
    kw = dict(max_new_tokens=20, do_sample=True, temperature=0.8, top_k=30, top_p=0.9, pad_token_id=0)
    runs = [fast_generate(fast, _ids(), generator=torch.Generator("cuda").manual_seed(s), **kw) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_fast_loop_within_max_memory(tmp_path, fast_loop):
    from shardq.loading.loader import load_sharded
    from shardq.runtime.fast_decode import fast_state

    model = tiny_lm("llama").half()
    model.save_pretrained(tmp_path)
    cap = 64 * 2**20
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(0)
    a = load_sharded(tiny_lm("llama").half(), tmp_path, max_memory={0: cap}, progress=False)
    torch.cuda.reset_peak_memory_stats(0)
    a.generate(_ids(), cache_implementation="static", **GEN)
    assert fast_state(a).stats["fast"] == 1
    assert torch.cuda.max_memory_allocated(0) - base <= cap


@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
def test_fused_fast_loop_matches_eager(quant, tmp_path, fast_loop):
    """Inductor-compiled steps captured in the loop's graph, on an fp32 model (no 16-bit re-rounding between fused
    ops): compiled once, captured once, the same greedy tokens as eager generate()."""
    from shardq.loading.loader import load_sharded
    from shardq.runtime.decode import set_graph_decode
    from shardq.runtime.fast_decode import fast_state

    model = tiny_lm("llama")
    model.save_pretrained(tmp_path)
    load = dict(max_memory={0: "2GB"}, quant=quant, progress=False, dtype=torch.float32)
    fast = load_sharded(tiny_lm("llama"), tmp_path, **load)
    eager = load_sharded(tiny_lm("llama"), tmp_path, **load)
    set_graph_decode(fast, fuse=True)
    ids = _ids()
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static")
    want = eager.generate(ids, disable_compile=True, **kw)
    got = fast.generate(ids, **kw)
    stats = fast_state(fast).stats
    assert stats["fast"] == 1 and stats["captures"] == 1 and fast_state(fast).compiled is not None
    assert torch.equal(got, want)
