"""Tiny real transformers architectures for planner tests, built on the meta device or saved with random weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402  (after HF_HUB_OFFLINE)
from safetensors.torch import save_file  # noqa: E402

ARCHS = ("llama", "opt", "bloom", "t5", "gpt2")


def tiny_config(arch: str, hidden: int = 64, layers: int = 4, vocab: int = 512, tie: bool | None = None):
    """A small config of `arch`; `tie` overrides tie_word_embeddings."""
    heads = max(2, hidden // 32)
    extra = {} if tie is None else {"tie_word_embeddings": tie}
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                                        vocab_size=vocab, max_position_embeddings=256, **extra)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=hidden, ffn_dim=hidden * 4, num_hidden_layers=layers,
                                      num_attention_heads=heads, vocab_size=vocab, word_embed_proj_dim=hidden,
                                      max_position_embeddings=256, **extra)
    if arch == "bloom":
        return transformers.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, **extra)
    if arch == "t5":
        return transformers.T5Config(d_model=hidden, d_ff=hidden * 2, d_kv=hidden // heads, num_layers=layers,
                                     num_decoder_layers=max(1, layers // 2), num_heads=heads, vocab_size=vocab, **extra)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=256,
                                       bos_token_id=0, eos_token_id=0, **extra)
    raise ValueError(arch)


def model_class(arch: str):
    return {"llama": transformers.LlamaForCausalLM, "opt": transformers.OPTForCausalLM,
            "bloom": transformers.BloomForCausalLM, "t5": transformers.T5ForConditionalGeneration,
            "gpt2": transformers.GPT2LMHeadModel}[arch]


def meta_model(arch: str, dtype: torch.dtype = torch.float16, **kw) -> torch.nn.Module:
    """A tiny `arch` model on the meta device."""
    cfg = tiny_config(arch, **kw)
    with torch.device("meta"):
        return model_class(arch)._from_config(cfg, dtype=dtype).eval()


def save_checkpoint(arch: str, path: Path, dtype: torch.dtype = torch.float16, shards: int = 1, **kw) -> Path:
    """Save a tiny `arch` model with random weights as config.json + safetensors (sharded when shards > 1)."""
    torch.manual_seed(0)
    cfg = tiny_config(arch, **kw)
    model = model_class(arch)(cfg).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    cfg.architectures = [type(model).__name__]
    cfg.dtype = dtype
    cfg.save_pretrained(path)
    seen: dict[int, str] = {}
    state = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied copies are saved once, as transformers does
            continue
        seen[t.data_ptr()] = name
        state[name] = t.contiguous()
    names = sorted(state)
    if shards == 1:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        return path
    import json

    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_file({n: state[n] for n in part}, path / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def rewrite_checkpoint(ckpt_dir: Path, out_dir: Path, edit) -> Path:
    """A single-file copy of a saved checkpoint (config.json included) after `edit` changed its tensor dict in
    place: for tests of broken checkpoints."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    edit(tensors)
    out_dir.mkdir()
    save_file(tensors, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text((ckpt_dir / "config.json").read_text())
    return out_dir


def save_sharded_models(tmp_path_factory, archs, build) -> dict:
    """arch -> (reference model from `build(arch)`, its checkpoint saved by transformers in 40 KB shards)."""
    out = {}
    for arch in archs:
        ref = build(arch)
        d = tmp_path_factory.mktemp(arch)
        ref.save_pretrained(d, max_shard_size="40KB")
        assert (d / "model.safetensors.index.json").exists()
        out[arch] = (ref, d)
    return out
