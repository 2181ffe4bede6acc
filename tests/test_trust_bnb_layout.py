"""Checkpoints in the bitsandbytes serialized layout go through the same transformers 5 renames as float ones:
written by shardq's own writer in the layout transformers writes (its reverse renames included, e.g. GPT-NeoX's
head saved as `embed_out.weight`), then loaded by load_sharded (CPU + disk) and load_quantized, across the
architecture sweep; the result equals the same quantization applied in memory."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from test_architectures import ARCHS, VOCAB, _load, _logits, config  # noqa: E402

from shardq.checkpoint.index import index_checkpoint  # noqa: E402
from shardq.quant.convert import quantize_model  # noqa: E402
from shardq.quant.serialize import load_quantized, save_quantized  # noqa: E402


def neox_config():
    return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128, rotary_pct=0.25,
                                      tie_word_embeddings=False)


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = neox_config() if arch == "gpt_neox" else config(arch)
    auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "shared" not in name and "wte" not in name:
                p[:, :2] *= 8
    return model


def bnb_checkpoint(arch: str, method: str, path) -> tuple[torch.nn.Module, object]:
    """(the model quantized in memory, its checkpoint written by save_quantized)."""
    qref = quantize_model(build(arch), method)
    cfg = qref.config
    cfg.architectures = [type(qref).__name__]
    save_quantized(qref, path, max_shard_size="60KB")
    return qref, path


@pytest.mark.parametrize("arch", ["gpt_neox", *ARCHS])
def test_bnb_layout_loads_like_in_memory_quantization_nf4(arch, tmp_path):
    qref, ckpt = bnb_checkpoint(arch, "nf4", tmp_path / "ck")
    model = _load(ckpt, tmp_path / "off", None)
    torch.testing.assert_close(_logits(model), _logits(qref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "bart", "phi3"])
def test_bnb_layout_int8_and_load_quantized(arch, tmp_path):
    qref, ckpt = bnb_checkpoint(arch, "int8", tmp_path / "ck")
    model = _load(ckpt, tmp_path / "off", None)
    torch.testing.assert_close(_logits(model), _logits(qref), rtol=1e-5, atol=1e-5)
    direct = load_quantized(build(arch), ckpt)  # a float model of the architecture, its weights replaced
    torch.testing.assert_close(_logits(direct), _logits(qref), rtol=1e-5, atol=1e-5)


def test_neox_head_is_written_and_read_as_embed_out(tmp_path):
    qref, ckpt = bnb_checkpoint("gpt_neox", "nf4", tmp_path / "ck")
    keys = set(index_checkpoint(ckpt).tensors)
    assert "embed_out.weight" in keys and not any(k.startswith("lm_head.") for k in keys)  # as transformers writes
    model = _load(ckpt, tmp_path / "off", "nf4")  # the checkpoint's own quantization, asked for again
    torch.testing.assert_close(_logits(model), _logits(qref), rtol=1e-5, atol=1e-5)


def test_transformers_with_bitsandbytes_loads_shardq_writes(tmp_path):
    pytest.importorskip("bitsandbytes")
    qref, ckpt = bnb_checkpoint("gpt_neox", "nf4", tmp_path / "ck")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu")
    ref = copy.deepcopy(qref)
    torch.testing.assert_close(_logits(loaded).float(), _logits(ref).float(), rtol=1e-3, atol=1e-3)
