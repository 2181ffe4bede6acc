"""dispatch_model on GPUs: streamed and mixed offload against the GPU-resident model, the two-slot memory bound,
quantized blocks streamed packed, and a split across two GPUs. Skipped without CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from test_dispatch import blocks, clone, inputs, tiny

from shardq.runtime.dispatch import dispatch_model, memory_report

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _gpu_ref(model):
    return clone(model).cuda()


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "t5"])
def test_streamed_model_matches_gpu_resident(arch):
    model = tiny(arch)
    ref = _gpu_ref(model)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="stream", execution_device=0)
    assert model.shardq_runtime.streamer.blocks["lm_head" if arch != "t5" else "shared"].buffer.is_pinned()
    kw = {k: v.cuda() for k, v in inputs(arch).items()}
    with torch.no_grad():
        got, want = model(**kw).logits, ref(**kw).logits
    assert got.device == torch.device("cuda", 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kw.pop("decoder_input_ids", None)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw, **gen), ref.generate(**kw, **gen))


def test_mixed_gpu_cpu_stream_disk(tmp_path):
    model = tiny("llama", tie=False)
    ref = _gpu_ref(model)
    names = blocks(model)
    dmap = {n: 0 for n in names}
    dmap.update({"model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": "cpu"})
    modes = {"model.layers.0": "stream", "lm_head": "cpu"}
    dispatch_model(model, dmap, offload_modes=modes, offload_dir=tmp_path)
    kw = {k: v.cuda() for k, v in inputs("llama").items()}
    with torch.no_grad():
        got, want = model(**kw).logits, ref(**kw).logits
    assert got.device == torch.device("cuda", 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # lm_head ran on the CPU
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw, **gen), ref.generate(**kw, **gen))


def test_streaming_holds_at_most_two_blocks():
    model = tiny("llama", tie=False)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="stream", execution_device=0)
    st = model.shardq_runtime.streamer
    slots = sum(s.buffer.numel() for s in st.slots)
    assert len(st.slots) == 2 and slots < sum(b.nbytes for b in st.blocks.values())
    kw = {k: v.cuda() for k, v in inputs("llama").items()}
    with torch.no_grad():
        model(**kw)  # warm-up: library workspaces are allocated once here
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    with torch.no_grad():
        model(**kw)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated(0) - base
    acts = 64 * 2 * 9 * 4 * 64  # generous activation bound for this tiny model (bytes)
    assert peak_extra <= acts, (peak_extra, acts)  # slots are preallocated: streaming allocates nothing per forward
    assert memory_report(model)["0"]["stream_slots"] == slots


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_blocks_streamed_on_gpu(method):
    from shardq.config import QuantConfig
    from shardq.quant.convert import quantize_model

    cfg = QuantConfig(method=method, compute_dtype=torch.float32) if method == "nf4" else QuantConfig(method="int8")
    model = quantize_model(tiny("llama", tie=False), cfg, skip=["lm_head"])
    ref = quantize_model(tiny("llama", tie=False), cfg, skip=["lm_head"]).cuda()
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="stream", execution_device=0)
    kw = {k: v.cuda() for k, v in inputs("llama").items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, ref(**kw).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_split_across_two_gpus():
    model = tiny("llama", tie=True)
    ref = _gpu_ref(model)
    names = blocks(model)
    dmap = {n: (0 if i < len(names) // 2 else 1) for i, n in enumerate(names)}
    dispatch_model(model, dmap)
    assert model.model.layers[-1].mlp.up_proj.weight.device == torch.device("cuda", 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    kw = {k: v.cuda() for k, v in inputs("llama").items()}
    with torch.no_grad():
        got, want = model(**kw).logits, ref(**kw).logits
    assert got.device == torch.device("cuda", 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw, **gen), ref.generate(**kw, **gen))



def test_rule_chooses_cpu_for_the_embedding_and_stream_for_layers(monkeypatch):
    """No offload_modes: the embedding (a lookup whose table outweighs the rows it sends) runs on the CPU, decoder
    layers and the head stream to GPU 0, and the result matches the GPU-resident model."""
    import test_dispatch

    monkeypatch.setattr(test_dispatch, "VOCAB", 1031)  # more rows than the 512 tokens of the default workload
    model = tiny("llama", tie=False)
    ref = _gpu_ref(model)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, execution_device=0)
    modes = model.shardq_offload_modes
    assert modes["model.embed_tokens"] == "cpu" and modes["model.layers.0"] == "stream" and modes["lm_head"] == "stream"
    kw = {k: v.cuda() for k, v in inputs("llama").items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, ref(**kw).logits, rtol=1e-5, atol=1e-5)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw, **gen), ref.generate(**kw, **gen))


@pytest.mark.parametrize("mode", ["cpu", "stream"])
def test_model_device_is_the_gpu_with_the_embedding_offloaded(mode):
    """With model.model.embed_tokens offloaded, `model.device` is the GPU where outputs come back, so generate()
    does not warn about inputs on another device type (nor route them through the CPU)."""
    model = tiny("llama", tie=False).half()
    ref = clone(model).half().cuda()
    dmap = {n: 0 for n in blocks(model)}
    dmap["model.embed_tokens"] = "cpu"
    dispatch_model(model, dmap, offload_modes={"model.embed_tokens": mode})
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert model.device.type == "cuda" and model.device == torch.device("cuda", 0) and model.dtype == torch.float16
    kw = {k: v.cuda() for k, v in inputs("llama").items()}
    kw.pop("decoder_input_ids", None)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(**kw, **gen)
    assert out.device.type == "cuda"
    assert not [w for w in caught if "different than your model's device" in str(w.message)], \
        [str(w.message) for w in caught]
    assert torch.equal(out, ref.generate(**kw, **gen))


def test_loaded_model_with_embedding_on_cpu_runs_fp16_on_gpu(tmp_path):
    """load_sharded with the embedding on "cpu": the rule runs it on the CPU (loaded in fp32), its rows reach
    the fp16 GPU layers in fp16, `model.device`/`model.dtype` say cuda/fp16, and results equal the GPU load."""
    from _f_models import save_checkpoint
    from shardq.loading.loader import load_sharded_from_dir

    ckpt = save_checkpoint("llama", tmp_path / "ckpt", dtype=torch.float16, tie=False, vocab=1031)
    dmap = {"model.embed_tokens": "cpu", "model.layers": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    model = load_sharded_from_dir(ckpt, max_memory={0: "1GB", "cpu": "1GB"}, device_map=dmap, progress=False)
    ref = load_sharded_from_dir(ckpt, max_memory={0: "1GB"}, device_map={"": 0}, progress=False)
    assert model.shardq_offload_modes["model.embed_tokens"] == "cpu"
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.device == torch.device("cuda", 0) and model.dtype == torch.float16
    ids = torch.randint(3, 1031, (1, 12), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(ids, **gen)
    assert not [w for w in caught if "different than your model's device" in str(w.message)]
    assert torch.equal(out, ref.generate(ids, **gen))
