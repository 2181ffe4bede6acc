"""Adapter training on the GPU (skipped without one): the CUDA kernels' backward against the dequantized fp32 model,
adapters of streamed blocks created on the GPU, and a step with streamed blocks equal to the resident model."""

from __future__ import annotations

import copy

import pytest
import torch
from test_train_peft import NF4, _stream_map, batch, lora, tiny

import shardq.training
from shardq.config import QuantConfig
from shardq.quant.convert import dequantize_model, quantize_model
from shardq.runtime.dispatch import dispatch_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _grads(model) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**{k: v.cuda() for k, v in batch().items()}).loss.backward()
    return {n: p.grad.float().cpu() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("cfg", [NF4, QuantConfig(method="int8", threshold=6.0)], ids=["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_adapter_grads_match_the_dequantized_model(cfg, dtype):
    quant = quantize_model(tiny("llama").to(dtype).cuda(), cfg, skip=["lm_head"])
    ref = dequantize_model(copy.deepcopy(quant)).float()
    got, want = _grads(lora(quant)), _grads(lora(ref))
    tol = 0.02 if dtype == torch.float32 and cfg.method == "nf4" else 0.1
    for name in want:
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert err < tol, (name, err)


def test_gpu_streamed_step_equals_resident_and_adapters_live_on_the_gpu():
    ref = lora(shardq.training.prepare_model_for_kbit_training(
        quantize_model(tiny("llama", layers=3).cuda(), NF4, skip=["lm_head"]), upcast_norms=False)).train()
    model = quantize_model(tiny("llama", layers=3), NF4, skip=["lm_head"])
    dmap, modes = _stream_map(model)
    dmap.update({"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0})
    modes = {"model.layers": "stream"}
    dispatch_model(model, dmap, offload_modes=modes)
    model = lora(shardq.training.prepare_model_for_kbit_training(model, upcast_norms=False)).train()
    assert all(p.is_cuda for n, p in model.named_parameters() if "lora_" in n)
    got = _grads(model)
    want = _grads(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


def _peak_step(model) -> int:
    """Allocator peak (bytes) of one forward + backward, measured from the state after set-up."""
    ids = torch.randint(0, 97, (1, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def test_gpu_streamed_step_holds_less_than_the_resident_weights():
    """Six layers of ~6.7 MB (nf4): streamed, the GPU holds two slots of one layer during the step, the backward
    included (it re-streams into the same slots), instead of all six."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=3072, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=8, vocab_size=97)
    peaks = {}
    for streamed in (False, True):
        torch.manual_seed(0)
        model = quantize_model(transformers.LlamaForCausalLM(cfg), NF4, skip=["lm_head"])
        if streamed:
            names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
            dmap = {n: 0 for n in names} | {f"model.layers.{i}": "cpu" for i in range(6)}
            dispatch_model(model, dmap, offload_modes={"model.layers": "stream"})
        else:
            model.cuda()
        model = lora(shardq.training.prepare_model_for_kbit_training(model), target_modules=["q_proj", "v_proj"])
        model.train()
        weights = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "layers." in n)
        peaks[streamed] = _peak_step(model)
        del model
        torch.cuda.empty_cache()
    layer = weights / 6
    assert peaks[True] < peaks[False] - 3 * layer, (peaks, layer)
