"""PEFT LoRA on shardq-quantized models on the CPU (shardq.training): adapter gradients against the same LoRA on the
dequantized fp32 model (Llama and Qwen2), optimizer steps, adapter save/load, merge, a step with streamed blocks,
and the refusals."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import shardq.training
from shardq.config import QuantConfig
from shardq.quant.convert import dequantize_model, quantize_model
from shardq.quant.linear import Linear4bit
from shardq.runtime.dispatch import dispatch_model
from shardq.training.peft import QuantLoraLinear

VOCAB = 97
NF4 = QuantConfig(method="nf4", double_quant=True)
INT8_EXACT = QuantConfig(method="int8", threshold=1e-12)  # every column an outlier: x @ W_deq.T exactly
INT8 = QuantConfig(method="int8", threshold=6.0)


def tiny(arch: str, layers: int = 2) -> nn.Module:
    """A tiny fp32 `arch` model (seeded), with non-trivial norms."""
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    cfg = transformers.LlamaConfig(**common) if arch == "llama" else transformers.Qwen2Config(**common)
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def lora(model: nn.Module, **kw) -> nn.Module:
    """Rank-4 LoRA on every quantized layer, lora_B non-zero (so lora_A gets gradients too), seeded."""
    targets = kw.pop("target_modules", None) or shardq.training.linear_names(model) or \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  init_lora_weights="gaussian", **kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return peft_model


def batch(seed: int = 0) -> dict:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def quantized_and_reference(arch: str, cfg: QuantConfig):
    """(the quantized model with LoRA, the same LoRA on the dequantized fp32 model)."""
    quant = quantize_model(tiny(arch), cfg, skip=["lm_head"])
    ref = dequantize_model(copy.deepcopy(quant))
    return lora(quant), lora(ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("cfg", [NF4, INT8_EXACT], ids=["nf4", "int8-all-outliers"])
def test_adapter_grads_equal_the_dequantized_float_model(arch, cfg):
    quant, ref = quantized_and_reference(arch, cfg)
    assert all(isinstance(m, QuantLoraLinear) for n, m in quant.named_modules() if n.endswith("q_proj"))
    got, want = lora_grads(quant), lora_grads(ref)
    assert set(got) == set(want) and len(got) == 2 * 7 * 2
    for name in want:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("cfg", [NF4, INT8_EXACT], ids=["nf4", "int8-all-outliers"])
def test_trained_biases_get_the_float_model_gradients(cfg):
    """LoraConfig(bias="all") trains the quantized layers' biases (Qwen2's q/k/v have some) through the op's
    autograd; the layers then bypass `ops.call`'s direct CUDA path, which has no autograd."""
    quant = quantize_model(tiny("qwen2"), cfg, skip=["lm_head"])
    ref = dequantize_model(copy.deepcopy(quant))
    grads = []
    for model in (lora(quant, bias="all"), lora(ref, bias="all")):
        lora_grads(model)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    got, want = grads
    biases = [n for n in want if n.endswith("q_proj.base_layer.bias")]
    assert biases and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_int8_adapter_grads_close_to_the_float_model():
    """LLM.int8() with outliers quantizes activations: the gradients differ by that rounding only."""
    quant, ref = quantized_and_reference("llama", INT8)
    got, want = lora_grads(quant), lora_grads(ref)
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err < 0.05, (name, err)


def test_optimizer_steps_reduce_the_loss():
    model = lora(quantize_model(tiny("llama"), NF4, skip=["lm_head"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".weight")}
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(**batch()).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)  # base stays frozen


def test_adapter_save_load_round_trip(tmp_path):
    model = lora(quantize_model(tiny("qwen2"), NF4, skip=["lm_head"]))
    with torch.no_grad():
        want = model(**batch()).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "_custom_modules" not in saved and saved["r"] == 4  # a plain PEFT adapter
    fresh = quantize_model(tiny("qwen2"), NF4, skip=["lm_head"])
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded.base_model.model.model.layers[1].mlp.down_proj, QuantLoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, want, rtol=0, atol=0)


def test_merge_requantizes_and_unmerge_restores_the_adapter_path():
    model = lora(quantize_model(tiny("llama"), NF4, skip=["lm_head"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    expected = Linear4bit.from_linear(nn.Linear(64, 64, bias=False), NF4)
    delta = layer.get_delta_weight("default").detach()
    expected.load_from_float(base.dequantized_weight(torch.float32) + delta)
    x = torch.randn(3, 64)
    with torch.no_grad(), pytest.warns(UserWarning, match="re-quantizes"):
        unmerged = layer(x)
        layer.merge()
        assert torch.equal(base.weight, expected.weight) and torch.equal(base.absmax, expected.absmax)
        merged = layer(x)
        layer.unmerge()
    assert not layer.merged
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert rel < 0.2  # one more 4-bit rounding of W + delta


def _stream_map(model: nn.Module) -> tuple[dict, dict]:
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    names += [f"model.layers.{i}" for i in range(len(model.model.layers))]
    return {n: "cpu" for n in names}, {"model.layers": "stream", "model.embed_tokens": "cpu",
                                       "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("disk", [False, True], ids=["stream", "stream+disk"])
def test_step_with_streamed_blocks_equals_the_resident_model(tmp_path, disk):
    """Decoder layers streamed (two slots for three layers; the middle one read from disk, meta at rest): the
    checkpoint around each block's streaming forward streams it in again for its backward, so the adapter
    gradients equal those of the undispatched model."""
    ref = lora(shardq.training.prepare_model_for_kbit_training(
        quantize_model(tiny("llama", layers=3), NF4, skip=["lm_head"]), upcast_norms=False))
    model = quantize_model(tiny("llama", layers=3), NF4, skip=["lm_head"])
    dmap, modes = _stream_map(model)
    if disk:
        dmap["model.layers.1"] = "disk"
    dispatch_model(model, dmap, offload_modes=modes, offload_dir=tmp_path)
    assert model.shardq_offload_modes["model.layers.1"] == ("disk" if disk else "stream")
    model = lora(shardq.training.prepare_model_for_kbit_training(model, upcast_norms=False))
    ref.train()
    model.train()
    streamer = model.base_model.model.shardq_runtime.streamer
    acquired: list[str] = []
    acquire = streamer.acquire
    streamer.acquire = lambda name: acquired.append(name) or acquire(name)
    got, want = lora_grads(model), lora_grads(ref)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    layers = [f"model.layers.{i}" for i in range(3)]
    assert acquired == layers + layers[::-1]  # each layer streamed in for its forward, again for its backward
    inner = model.base_model.model.model
    assert all(not inner.layers[i].gradient_checkpointing for i in range(3))  # checkpointed around the streaming


def test_streamed_backward_without_checkpointing_fails_loudly():
    """Without recomputation the saved weights are slot views that the next layers overwrote: autograd refuses
    (version counter) instead of computing wrong gradients, and the helper refuses the setting up front."""
    model = quantize_model(tiny("llama", layers=3), NF4, skip=["lm_head"])
    dmap, modes = _stream_map(model)
    dispatch_model(model, dmap, offload_modes=modes)
    with pytest.raises(ValueError, match="use_gradient_checkpointing=True"):
        shardq.training.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = lora(model)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(**batch()).loss.backward()


def test_prepare_freezes_upcasts_norms_and_checkpoints():
    model = quantize_model(tiny("llama").to(torch.bfloat16), NF4, skip=["lm_head"])
    for p in model.parameters():
        p.requires_grad_(True)
    shardq.training.prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # only norms: the tables stay small
    # transformers' flag is is_activation_checkpointing in recent releases, is_gradient_checkpointing before
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="use_gradient_checkpointing=False"):
        shardq.training.prepare_model_for_kbit_training(nn.Sequential(Linear4bit(64, 64)))


@pytest.mark.parametrize("kw,match", [({"use_dora": True}, "variant"), ({"init_lora_weights": "pissa"}, "pissa"),
                                      ({"fan_in_fan_out": True}, "fan_in_fan_out")])
def test_unsupported_lora_options_are_refused(kw, match):
    model = quantize_model(tiny("llama"), NF4, skip=["lm_head"])
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], **kw))


def test_disk_layers_without_the_helper_are_refused(tmp_path):
    """A disk block's weights are meta at rest: without the recorded execution device the adapters would have no
    device to go to, so get_peft_model says which call is missing."""
    model = quantize_model(tiny("llama"), NF4, skip=["lm_head"])
    dmap, modes = _stream_map(model)
    dmap["model.layers.1"] = "disk"
    dispatch_model(model, dmap, offload_modes=modes, offload_dir=tmp_path)
    with pytest.raises(ValueError, match="prepare_model_for_kbit_training"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
