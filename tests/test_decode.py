"""Graph decode on the CPU: the run rule, the static buffers, cache adoption and token equality of static-cache
generate() through shardq's decoder (CPU blocks captured by graphs.ReplayGraph, the CPU stand-in of a CUDA graph)
against the undispatched model, for Llama, Qwen2, Mistral, GPT-NeoX and OPT-style tiny models."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
from test_dispatch import blocks
from transformers import CompileConfig

from shardq.runtime import decode, graphs
from shardq.runtime.dispatch import dispatch_model, needs_wrapper
from shardq.runtime.graphs import Call, split_runs

ARCHS = ("llama", "qwen2", "mistral", "gpt_neox", "opt")
GEN = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)


def tiny_lm(arch: str) -> torch.nn.Module:
    """A tiny fp32 decoder-only model of `arch` with random weights (seeded)."""
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=211)
    if arch == "opt":
        cfg = transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128,
                                     tie_word_embeddings=False, **common)
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(intermediate_size=128, max_position_embeddings=128,
                                         tie_word_embeddings=False, **common)
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[arch]
        cfg = cls(intermediate_size=96, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, **common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def cpu_compile_config() -> CompileConfig:
    """transformers asks for the compiled (here: graph) call on GPUs only, unless told to on every device."""
    cc = CompileConfig()
    cc._compile_all_devices = True
    return cc


@pytest.fixture
def capture_cpu(monkeypatch):
    monkeypatch.setattr(decode, "CAPTURE_CPU", True)


def _dispatched(arch: str, tmp_path, disk_layer: bool):
    model = tiny_lm(arch)
    ref = copy.deepcopy(model)
    dmap = {n: "cpu" for n in blocks(model)}
    if disk_layer:
        dmap[next(n for n in dmap if n.endswith("layers.1"))] = "disk"
    # CPU-run blocks with the CPU as execution device on any host (with a GPU they would otherwise stream to it)
    dispatch_model(model, dmap, offload_dir=tmp_path, offload_modes="cpu", execution_device="cpu")
    return model, ref


# ---------------------------------------------------------------------------------------------------------------
# the run rule


def test_split_runs_cuts_at_eager_calls_devices_and_foreign_inputs():
    g0, g1 = torch.device("cuda", 0), torch.device("cuda", 1)
    calls = [Call("embed", None), Call("l0", g0, True), Call("l1", g0), Call("l2", None), Call("l3", g0, True),
             Call("l4", g0), Call("l5", g1, True), Call("l6", g1), Call("l7", g1, True), Call("head", g1)]
    assert split_runs(calls) == [["l0", "l1"], ["l3", "l4"], ["l5", "l6"], ["l7", "head"]]
    assert split_runs([Call("a", g0, True), Call("b", g0), Call("c", g0)]) == [["a", "b", "c"]]
    assert split_runs([Call("a", None), Call("b", None)]) == []


def test_signature_and_static_copy():
    x, m = torch.randn(2, 1), torch.ones(2, 1, 1, 8)
    kw = {"input_ids": x, "attention_mask": m, "cache": object(), "use_cache": True}
    sig = graphs.signature(((), kw))
    assert sig == graphs.signature(((), dict(kw, input_ids=torch.randn(2, 1))))
    assert sig != graphs.signature(((), dict(kw, input_ids=torch.randn(3, 1))))
    assert sig != graphs.signature(((), dict(kw, input_ids=x.half())))
    static = graphs.static_copy(((), kw))[1]
    assert static["cache"] is kw["cache"] and static["input_ids"] is not x and torch.equal(static["input_ids"], x)
    new = torch.randn(2, 1)
    graphs.copy_leaves([static["input_ids"]], [new])
    assert torch.equal(static["input_ids"], new)


# ---------------------------------------------------------------------------------------------------------------
# generate() through the decoder


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("disk_layer", [False, True], ids=["whole", "runs"])
def test_static_generate_tokens_equal_eager(arch, disk_layer, tmp_path, capture_cpu):
    model, ref = _dispatched(arch, tmp_path, disk_layer)
    ids = torch.randint(1, 200, (2, 5), generator=torch.Generator().manual_seed(1))
    want_static = ref.generate(ids, cache_implementation="static", disable_compile=True, **GEN)
    want_dynamic = ref.generate(ids, **GEN)
    got = model.generate(ids, cache_implementation="static", compile_config=cpu_compile_config(), **GEN)
    assert torch.equal(got, want_static) and torch.equal(got, want_dynamic)
    dec = model.shardq_runtime.decoder
    assert dec.stats["captures"] == 1 and dec.stats["replays"] == GEN["max_new_tokens"] - 3  # prefill, warm-up, capture
    assert (dec.whole_device is None) == disk_layer
    step = next(iter(dec.steps.values()))
    if disk_layer:  # the disk layer is eager, so the step is cut in runs around it
        eager = [r.name for r in step.recs if r.run is None]
        assert eager == [n for n in model.shardq_device_map if n.endswith("layers.1")]
        assert dec.graph_count() >= 2
    for _ in range(2):  # each generate() makes a new cache of the same shapes: adopted, not captured again
        again = model.generate(ids, cache_implementation="static", compile_config=cpu_compile_config(), **GEN)
        assert torch.equal(again, want_static)
    assert dec.stats["captures"] == 1 and dec.stats["adopted"] == 2


def test_left_padded_batch_and_new_batch_size_recaptures(tmp_path, capture_cpu):
    model, ref = _dispatched("llama", tmp_path, disk_layer=True)
    ids = torch.randint(1, 200, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    kw = dict(cache_implementation="static", **GEN)
    want = ref.generate(ids, attention_mask=mask, disable_compile=True, **kw)
    got = model.generate(ids, attention_mask=mask, compile_config=cpu_compile_config(), **kw)
    assert torch.equal(got, want)
    got1 = model.generate(ids[1:2], compile_config=cpu_compile_config(), **kw)
    assert torch.equal(got1, ref.generate(ids[1:2], disable_compile=True, **kw))
    assert model.shardq_runtime.decoder.stats["captures"] == 2


def test_steps_of_old_signatures_are_freed(tmp_path, capture_cpu):
    """Captured steps (static inputs + the cache they were captured on) beyond MAX_STEPS are dropped, least
    recently used first; tokens stay equal to eager."""
    from shardq.runtime import decode

    model, ref = _dispatched("llama", tmp_path, disk_layer=False)
    kw = dict(cache_implementation="static", **GEN)
    for batch in range(1, decode.MAX_STEPS + 3):
        ids = torch.randint(1, 200, (batch, 5), generator=torch.Generator().manual_seed(batch))
        got = model.generate(ids, compile_config=cpu_compile_config(), **kw)
        assert torch.equal(got, ref.generate(ids, disable_compile=True, **kw))
        assert len(model.shardq_runtime.decoder.steps) <= decode.MAX_STEPS
    assert model.shardq_runtime.decoder.stats["captures"] == decode.MAX_STEPS + 2


def test_sampling_with_fixed_seed_equals_eager(tmp_path, capture_cpu):
    model, ref = _dispatched("qwen2", tmp_path, disk_layer=False)
    ids = torch.randint(1, 200, (2, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(cache_implementation="static", do_sample=True, top_k=20, top_p=0.9, max_new_tokens=6, pad_token_id=0)
    torch.manual_seed(5)
    want = ref.generate(ids, disable_compile=True, **kw)
    torch.manual_seed(5)
    got = model.generate(ids, compile_config=cpu_compile_config(), **kw)
    assert torch.equal(got, want)


def test_set_graph_decode_makes_static_the_default_and_off_restores(tmp_path, capture_cpu):
    model, ref = _dispatched("mistral", tmp_path, disk_layer=False)
    decode.set_graph_decode(model)
    assert model.generation_config.cache_implementation == "static"
    ids = torch.randint(1, 200, (1, 4), generator=torch.Generator().manual_seed(4))
    got = model.generate(ids, compile_config=cpu_compile_config(), **GEN)
    assert torch.equal(got, ref.generate(ids, **GEN))
    assert model.shardq_runtime.decoder.stats["replays"] > 0
    decode.set_graph_decode(model, False)
    assert model.generation_config.cache_implementation is None and model.shardq_runtime.decoder is None


def test_prefill_and_grad_stay_eager(tmp_path, capture_cpu):
    model, _ = _dispatched("llama", tmp_path, disk_layer=False)
    dec = decode.decoder_of(model)
    ids = torch.randint(1, 200, (1, 4))
    out = dec(input_ids=ids)
    assert out.logits.shape == (1, 4, 211) and dec.stats == {"eager": 1, "captures": 0, "replays": 0, "adopted": 0}


def test_decoder_needs_a_dispatched_model():
    with pytest.raises(ValueError, match="dispatch_model"):
        decode.decoder_of(tiny_lm("llama"))
    with pytest.raises(ValueError, match="dispatch_model"):
        decode.set_graph_decode(tiny_lm("llama"))


def test_adopt_cache_copies_contents_and_refuses_other_shapes():
    cfg = tiny_lm("llama").config
    a, b, c = (transformers.StaticCache(config=cfg, max_cache_len=n) for n in (16, 16, 8))
    for cache in (a, b, c):
        cache.early_initialization(batch_size=1, num_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
    for layer in b.layers:
        layer.keys.normal_()
        layer.cumulative_length.fill_(3)
    want = [layer.keys.clone() for layer in b.layers]
    assert decode.adopt_cache(a, b)
    for la, lb, w in zip(a.layers, b.layers, want):
        assert lb.keys is la.keys and torch.equal(la.keys, w) and int(la.cumulative_length) == 3
    assert not decode.adopt_cache(a, c)


# ---------------------------------------------------------------------------------------------------------------
# no cost when nothing moves


def test_resident_blocks_get_no_wrapper():
    """On one device with nothing moving no block needs a wrapper; a CPU-run block among GPU ones keeps one."""
    from shardq.runtime.dispatch import Block

    g0, cpu = torch.device("cuda", 0), torch.device("cpu")
    resident = {n: Block(n, 0, "gpu", g0) for n in ("a", "b")}
    assert not any(needs_wrapper(b, resident, g0) for b in resident.values())
    mixed = dict(resident, c=Block("c", "cpu", "cpu", cpu, out_device=g0))
    assert not needs_wrapper(mixed["a"], mixed, g0) and needs_wrapper(mixed["c"], mixed, g0)
    other = dict(resident, d=Block("d", 1, "gpu", torch.device("cuda", 1)))
    assert needs_wrapper(other["a"], other, g0)
