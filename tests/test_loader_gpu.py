"""load_sharded on GPUs: the allocator's peak stays within max_memory while loading and during a 512-token
prefill, generate() equals the uncapped single-GPU result, and a failed load leaves nothing allocated.
Skipped without a GPU; the split tests need two."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from shardq.loading.loader import load_sharded_from_dir  # noqa: E402
from shardq.memory import parse_size  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 270 MB fp16 Llama-style checkpoint in 60 MB shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=16000)
    path = tmp_path_factory.mktemp("gpu_ckpt")
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(path, max_shard_size="60MB")
    return path


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, 16000, (1, n), generator=torch.Generator().manual_seed(2))


def _generate(model) -> torch.Tensor:
    x = _ids(24).cuda()
    out = model.generate(x, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    return out.cpu()


def _reset() -> dict[int, int]:
    """Drop what earlier tests left, reset the peak counters, and return what stays allocated (the baseline:
    caps promise the bytes shardq adds, not what other code holds)."""
    gc.collect()
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(i)
    return {i: torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())}


def _peaks(base: dict[int, int]) -> dict[int, int]:
    return {i: torch.cuda.max_memory_allocated(i) - base[i] for i in range(torch.cuda.device_count())}


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_peak_within_cap_while_loading_and_prefill_and_generate_equal(ckpt, quant):
    cap = "200MB"
    torch.zeros(1, device="cuda")
    base = _reset()
    model = load_sharded_from_dir(ckpt, dtype=torch.float16, max_memory={0: cap, "cpu": "8GB"}, quant=quant,
                                  workload=(1, 512), progress=False)
    load_peak = _peaks(base)[0]
    offloaded = any(p.device == "cpu" for p in model.shardq_plan.placements)
    with torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(0)
        model(_ids(512).cuda(), use_cache=False)
        prefill_peak = _peaks(base)[0]
        capped = _generate(model)
    del model
    assert load_peak <= parse_size(cap), f"loading peaked at {load_peak} bytes over the {cap} cap"
    assert offloaded  # the cap forced offload
    assert prefill_peak <= parse_size(cap), f"prefill peaked at {prefill_peak} bytes over the {cap} cap"
    whole = load_sharded_from_dir(ckpt, dtype=torch.float16, max_memory={0: "10GB"}, quant=quant, progress=False)
    with torch.inference_mode():
        torch.testing.assert_close(capped, _generate(whole), rtol=0, atol=0)


def test_fp32_compute_decode_within_cap(ckpt):
    """nf4 with fp32 compute (what a default BitsAndBytesConfig asks for): decode-sized forwards run the fp32 kernel,
    which needs no scratch, and the planner reserves none for them; loading and an 8-token forward stay within a
    cap that forces offload."""
    cap = "100MB"
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    torch.zeros(1, device="cuda")
    base = _reset()
    model = load_sharded_from_dir(ckpt, dtype=torch.float16, max_memory={0: cap, "cpu": "8GB"}, quant=quant,
                                  workload=(1, 8), progress=False)
    load_peak = _peaks(base)[0]
    assert any(p.device == "cpu" for p in model.shardq_plan.placements)  # the cap forced offload
    with torch.inference_mode():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(0)
        logits = model(_ids(8).cuda(), use_cache=False).logits
        peak = _peaks(base)[0]
    del model
    assert torch.isfinite(logits).all()
    assert load_peak <= parse_size(cap), f"loading peaked at {load_peak} bytes over the {cap} cap"
    assert peak <= parse_size(cap), f"the 8-token forward peaked at {peak} bytes over the {cap} cap"


def test_failed_load_leaves_no_gpu_memory(ckpt, monkeypatch):
    """A load that fails midway (after tensors were already quantized onto GPU 0) leaves nothing of itself on the
    GPU and the model as it was (all on meta, no quantized layer swapped in). Garbage from earlier tests is
    collected before the baseline is taken, and may still be freed during the call, so the check is `<=`."""
    import shardq.loading.loader as loader
    from shardq.hf import meta_model_from_dir

    model = meta_model_from_dir(ckpt, dtype=torch.float16)
    before = {n: (type(m), [(k, t.device.type, t.dtype, t.shape) for k, t in m.named_parameters(recurse=False)])
              for n, m in model.named_modules()}
    torch.zeros(1, device="cuda")
    base = _reset()[0]
    real, calls = loader._fetch, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("read failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "_fetch", flaky)
    with pytest.raises(OSError, match="read failed"):
        loader.load_sharded(model, ckpt, dtype=torch.float16, max_memory={0: "10GB"}, quant="nf4", progress=False)
    assert calls["n"] == 20  # it failed midway, with GPU tensors already placed
    gc.collect()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated(0)
    assert after <= base, f"the failed load left {after - base} bytes allocated on GPU 0"
    now = {n: (type(m), [(k, t.device.type, t.dtype, t.shape) for k, t in m.named_parameters(recurse=False)])
           for n, m in model.named_modules()}
    assert now == before and not hasattr(model, "shardq_runtime")
    assert all(t.device.type == "meta" for t in model.parameters())


@two_gpus
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_split_over_two_gpus_within_caps_and_equal_to_one_gpu(ckpt, quant):
    caps = {0: "150MB", 1: "200MB"}
    torch.zeros(1, device="cuda:0"), torch.zeros(1, device="cuda:1")
    base = _reset()
    model = load_sharded_from_dir(ckpt, dtype=torch.float16, max_memory=caps, quant=quant, progress=False)
    assert {p.device for p in model.shardq_plan.placements} == {0, 1}
    for i, peak in _peaks(base).items():
        assert peak <= parse_size(caps[i]), f"GPU {i} peaked at {peak} while loading"
    with torch.inference_mode():
        for i in (0, 1):
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
        model(_ids(512).cuda(), use_cache=False)
        for i, peak in _peaks(base).items():
            assert peak <= parse_size(caps[i]), f"GPU {i} peaked at {peak} during the prefill"
        split = _generate(model)
    del model
    whole = load_sharded_from_dir(ckpt, dtype=torch.float16, max_memory={0: "10GB"}, quant=quant, progress=False)
    with torch.inference_mode():
        torch.testing.assert_close(split, _generate(whole), rtol=0, atol=0)
