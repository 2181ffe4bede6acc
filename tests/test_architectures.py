"""load_sharded across more real transformers architectures (random weights, tiny configs), on the CPU.

Each model is saved with save_pretrained (sharded), built again on the meta device from its config.json and
loaded with every other block on disk and the rest on the CPU. In fp32 the logits must equal the reference
model's and greedy generate() must agree token for token; quantized, the logits must equal those of the same
quantization applied to the reference in memory (the loader adds no error of its own).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from shardq.hf import meta_model_from_dir  # noqa: E402
from shardq.loading.loader import load_sharded  # noqa: E402
from shardq.hf import no_split_modules  # noqa: E402
from shardq.planning.units import decompose  # noqa: E402
from shardq.quant.linear import QuantLinear  # noqa: E402
from shardq.quant.convert import quantize_model  # noqa: E402

VOCAB = 128
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)


def config(arch: str):
    T = transformers
    if arch == "mistral":
        return T.MistralConfig(**DECODER)
    if arch == "qwen2":
        return T.Qwen2Config(**DECODER)
    if arch == "qwen3":
        return T.Qwen3Config(**DECODER, head_dim=16)
    if arch == "gemma":  # scaled embedding: a non-persistent buffer beside the weight
        return T.GemmaConfig(**DECODER, head_dim=16)
    if arch == "gemma2":
        return T.Gemma2Config(**DECODER, head_dim=16)
    if arch == "phi3":  # fused qkv and gate_up projections
        return T.Phi3Config(**DECODER, pad_token_id=0)
    if arch == "phi":
        return T.PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4)
    if arch == "gptj":
        return T.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=128,
                            bos_token_id=0, eos_token_id=0)
    if arch == "falcon":
        return T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    if arch == "gpt2":  # Conv1D projections
        return T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128, bos_token_id=0,
                            eos_token_id=0)
    if arch == "bart":
        return T.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                            max_position_embeddings=128)
    raise ValueError(arch)


ARCHS = ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "phi", "gpt2", "gptj", "falcon", "bart"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (reference model, sharded checkpoint dir), built on first use."""
    cache: dict[str, tuple[torch.nn.Module, object]] = {}

    def get(arch: str):
        if arch not in cache:
            torch.manual_seed(0)
            cfg = config(arch)
            auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
            ref = auto.from_config(cfg).eval()
            with torch.no_grad():  # outlier input features, as real checkpoints have them
                for name, p in ref.named_parameters():
                    if p.dim() == 2 and "embed" not in name and "shared" not in name and "wte" not in name:
                        p[:, :2] *= 8
            d = tmp_path_factory.mktemp(arch)
            ref.save_pretrained(d, max_shard_size="60KB")
            cache[arch] = (ref, d)
        return cache[arch]

    return get


def _inputs(model: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    kw = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = ids[:, :3]
    return kw


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(model)).logits


def _load(ckpt, tmp_path, quant: str) -> torch.nn.Module:
    """Every other block on disk, the rest on the CPU."""
    units = decompose(meta_model_from_dir(ckpt), set(no_split_modules(meta_model_from_dir(ckpt))))
    device_map = {u: ("disk" if i % 2 else "cpu") for i, u in enumerate(units)}
    return load_sharded(meta_model_from_dir(ckpt), ckpt, quant=quant, max_memory={"cpu": "1GB", "disk": "1GB"},
                        device_map=device_map, workload=(2, 16), offload_dir=tmp_path, progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_equal_and_generate(saved, arch, tmp_path):
    ref, ckpt = saved(arch)
    model = _load(ckpt, tmp_path, "none")
    assert {"cpu", "disk"} <= set(model.shardq_offload_modes.values())
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=1e-5, atol=1e-5)
    ids = _inputs(ref)["input_ids"]
    kw = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    if ref.config.is_encoder_decoder:
        kw["decoder_start_token_id"] = 2
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_equals_in_memory_quantization(saved, arch, method, tmp_path):
    ref, ckpt = saved(arch)
    model = _load(ckpt, tmp_path, method)
    qref = quantize_model(copy.deepcopy(ref), method)
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert quantized > 0 and quantized == sum(isinstance(m, QuantLinear) for m in qref.modules())
    torch.testing.assert_close(_logits(model), _logits(qref), rtol=1e-4, atol=1e-4)
