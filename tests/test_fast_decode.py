"""The static graph loop of generate() on the CPU (the step runs eagerly): tokens equal to transformers' generate()
for Llama, Qwen2, Mistral, GPT-NeoX and OPT tiny models, left padding, EOS, sampling, the generate() hook's routing
and the support check."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
from test_decode import ARCHS, _dispatched

from shardq.runtime import decode, fast_decode
from shardq.runtime.fast_decode import Sampling, choose, fast_generate, fast_state, fast_support

REF = dict(cache_implementation="static", disable_compile=True, do_sample=False, pad_token_id=0)


@pytest.fixture
def fast_cpu(monkeypatch):
    """Route CPU models' generate() through the loop (the hook is off by default and leaves CPU models alone)."""
    monkeypatch.setattr(fast_decode, "FAST_CPU", True)
    monkeypatch.setattr(fast_decode, "ENABLED", True)


def _padded(batch: int = 2, length: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 200, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_generate(arch, tmp_path):
    model, ref = _dispatched(arch, tmp_path, disk_layer=False)
    ids, mask = _padded()
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=20, **REF)
    eos = ref.generation_config.eos_token_id
    got = fast_generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    one = fast_generate(model, ids[1:], max_new_tokens=1, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(one, ref.generate(ids[1:], max_new_tokens=1, **REF))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_fused_steps_compile_once_and_equal_generate(arch, tmp_path, monkeypatch):
    """`set_graph_decode(model, fuse=True)`: the step runs through torch.compile (aot_eager here: exact), fullgraph,
    compiled once per signature and reused by later calls."""
    monkeypatch.setattr(fast_decode, "FUSE_BACKEND", "aot_eager")
    model, ref = _dispatched(arch, tmp_path, disk_layer=False)
    decode.set_graph_decode(model, fuse=True)
    ids, mask = _padded()
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, **REF)
    eos = ref.generation_config.eos_token_id
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    got = fast_generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    again = fast_generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want) and torch.equal(again, want)
    longer, longer_mask = _padded(length=9, seed=2)  # another prompt length: the same bucketed cache and graph
    want = ref.generate(longer, attention_mask=longer_mask, max_new_tokens=12, **REF)
    assert torch.equal(
        fast_generate(model, longer, longer_mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0), want
    )
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    compiled = fast_state(model).compiled
    assert compiled is not None and compiled._orig_mod is model
    decode.set_graph_decode(model, fuse=False)
    assert not model.shardq_runtime.graph_fuse


def test_eos_midway_pads_and_stops_when_all_done(tmp_path):
    model, ref = _dispatched("llama", tmp_path, disk_layer=False)
    ids, mask = _padded()
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=40, **dict(REF, eos_token_id=None))
    eos = [int(free[0, ids.shape[1] + 3]), int(free[1, ids.shape[1] + 20])]
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=40, **dict(REF, eos_token_id=eos))
    got = fast_generate(model, ids, mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want) and got.shape[1] < ids.shape[1] + 40
    assert (got[0, ids.shape[1] + 4 :] == 0).any()
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=10, **dict(REF, eos_token_id=eos))
    got = fast_generate(model, ids, mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=0, min_new_tokens=10)
    assert torch.equal(got, want)


def test_sampling_reproducible_and_top_k_1_is_greedy(tmp_path):
    model, _ = _dispatched("qwen2", tmp_path, disk_layer=False)
    ids, mask = _padded()
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0)
    a = fast_generate(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    b = fast_generate(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    c = fast_generate(model, ids, mask, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = fast_generate(model, ids, mask, max_new_tokens=12, pad_token_id=0)
    k1 = fast_generate(model, ids, mask, generator=torch.Generator().manual_seed(9), **dict(kw, top_k=1))
    assert torch.equal(k1, greedy)


def test_choose_filters_like_transformers():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    s = Sampling(True, 0.7, 5, 0.8)
    procs = [
        transformers.TemperatureLogitsWarper(0.7),
        transformers.TopKLogitsWarper(5),
        transformers.TopPLogitsWarper(0.8),
    ]
    scores = logits
    for p in procs:
        scores = p(None, scores)
    allowed = scores.isfinite()
    for seed in range(20):
        noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(seed))
        tok = choose(logits, s, noise)
        assert allowed.gather(1, tok[:, None]).all()
    assert torch.equal(choose(logits, Sampling(), None), logits.argmax(-1))


def test_generate_hook_takes_fast_path_and_falls_back(tmp_path, fast_cpu):
    model, ref = _dispatched("mistral", tmp_path, disk_layer=False)
    ids, mask = _padded()
    stats = fast_state(model).stats
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=9, **REF)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=9, cache_implementation="static", pad_token_id=0)
    assert torch.equal(got, want) and stats["fast"] == 1 and stats["fallback"] == 0
    rep = dict(cache_implementation="static", max_new_tokens=9, pad_token_id=0, repetition_penalty=1.3)
    assert torch.equal(model.generate(ids, attention_mask=mask, **rep), ref.generate(ids, attention_mask=mask, **rep))
    assert stats["fast"] == 1 and stats["fallback"] == 1 and "repetition_penalty" in fast_state(model).last_fallback
    model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)  # dynamic cache: transformers
    assert stats["fallback"] == 2
    decode.set_graph_decode(model)  # static by default now
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=9, pad_token_id=0), want)
    assert stats["fast"] == 2


def test_loops_of_old_signatures_are_freed(tmp_path):
    """Prompts of ever new lengths reuse at most MAX_LOOPS kept loops (each holds a static cache and a graph)."""
    model, ref = _dispatched("llama", tmp_path, disk_layer=False)
    for length in (3, 4, 5, 6, 4):
        ids, mask = _padded(length=length, seed=length)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=3, **REF)
        assert torch.equal(fast_generate(model, ids, mask, max_new_tokens=3, pad_token_id=0), want)
        assert len(fast_state(model).loops) <= fast_decode.MAX_LOOPS
    assert fast_state(model).stats["fast"] == 5


def test_encoder_decoder_models_keep_transformers_loop(fast_cpu):
    from _f_models import model_class, tiny_config

    from shardq.runtime.dispatch import dispatch_model

    torch.manual_seed(0)
    model = model_class("t5")(tiny_config("t5")).eval()
    ref = copy.deepcopy(model)
    dispatch_model(model, {"": "cpu"})
    ids = torch.randint(2, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(
        max_new_tokens=4, do_sample=False, cache_implementation="static", decoder_start_token_id=0, pad_token_id=0
    )
    got = model.generate(ids, **kw)
    assert torch.equal(got, ref.generate(ids, disable_compile=True, **kw))
    assert fast_state(model).stats["fast"] == 0 and "encoder-decoder" in fast_state(model).last_fallback


def test_generate_hook_cpu_model_uses_transformers_without_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_decode, "ENABLED", True)
    model, ref = _dispatched("llama", tmp_path, disk_layer=False)
    ids, _ = _padded()
    model.generate(ids, max_new_tokens=3, cache_implementation="static", pad_token_id=0)
    assert fast_state(model).stats["fast"] == 0 and "CPU" in fast_state(model).last_fallback


def test_fast_generate_refuses_streamed_models(tmp_path):
    model, _ = _dispatched("llama", tmp_path, disk_layer=True)
    with pytest.raises(ValueError, match="resident on one device"):
        fast_generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)


def test_fast_support_lists_what_is_served():
    def cfg(**kw):
        return transformers.GenerationConfig(cache_implementation="static", max_new_tokens=4, **kw)

    served = [
        cfg(),
        cfg(do_sample=True, temperature=0.7, top_k=10, top_p=0.9),
        cfg(eos_token_id=[1, 2]),
        cfg(num_beams=1, repetition_penalty=1.0, min_new_tokens=3),
    ]
    for c in served:
        assert fast_support(c, {"attention_mask": None}) is None
    refused = [
        cfg(num_beams=2),
        cfg(repetition_penalty=1.2),
        cfg(min_length=3),
        cfg(stop_strings=["x"]),
        cfg(return_dict_in_generate=True),
        cfg(output_scores=True),
        cfg(no_repeat_ngram_size=2),
        cfg(do_sample=True, min_p=0.1),
        cfg(suppress_tokens=[3]),
        cfg(do_sample=True, num_return_sequences=2),
        transformers.GenerationConfig(max_new_tokens=4),
    ]
    for c in refused:
        assert fast_support(c, {}) is not None
    assert "streamer" in fast_support(cfg(), {}, {"streamer": object()})
    assert "logits_processor" in fast_support(cfg(), {}, {"logits_processor": [object()]})
    assert "inputs_embeds" in fast_support(cfg(), {"inputs_embeds": torch.zeros(1)})
    assert fast_support(cfg(), {}, {"streamer": None, "synced_gpus": False}) is None
