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
