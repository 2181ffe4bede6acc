"""Make the bitsandbytes reference fixtures under tests/fixtures/bnb/ (run once; the outputs are committed).

Uses bitsandbytes itself (its CPU backend by default, `--device cuda` for its CUDA kernels) and transformers
to record what shardq must reproduce without either: packed 4-bit bytes, absmax, double-quant statistics,
dequantized values, packed quant_state JSON, int8 row quantization and LLM.int8() layer outputs, and tiny
transformers checkpoints serialized by transformers + bitsandbytes with their logits.

    HF_HUB_OFFLINE=1 python tools/make_bnb_fixtures.py [--device cpu|cuda] [--out tests/fixtures/bnb]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (name, shape, dtype, blocksize, double quant); shapes are not multiples of the blocksize on purpose
BLOCKWISE_CASES = [
    ("odd_f32_bs32", (7, 5), torch.float32, 32, False),
    ("f32_bs64", (33, 77), torch.float32, 64, False),
    ("f16_bs64_dq", (64, 128), torch.float16, 64, True),
    ("bf16_bs64_dq_multi", (130, 257), torch.bfloat16, 64, True),
    ("f16_bs128", (16, 200), torch.float16, 128, False),
    ("f32_bs256_dq", (24, 100), torch.float32, 256, True),
]


def _weights(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen) * 0.05
    flat = w.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 200),), generator=gen)
    flat[idx] *= 40.0  # outliers
    return w.to(dtype)


def blockwise_fixtures(device: str, gen: torch.Generator) -> tuple[dict, dict]:
    import bitsandbytes.functional as F

    out, meta = {}, {}
    for qt in ("nf4", "fp4"):
        for name, shape, dtype, bs, dq in BLOCKWISE_CASES:
            key = f"{qt}_{name}"
            A = _weights(shape, dtype, gen)
            packed, st = F.quantize_4bit(A.to(device), blocksize=bs, quant_type=qt, compress_statistics=dq)
            out[f"{key}.A"] = A
            out[f"{key}.packed"] = packed.cpu()
            out[f"{key}.dequant"] = F.dequantize_4bit(packed, st).cpu()
            for k, v in st.as_dict(packed=True).items():
                out[f"{key}.{k}"] = v.cpu()
            meta[key] = {
                "quant_type": qt,
                "shape": list(shape),
                "dtype": str(dtype).removeprefix("torch."),
                "blocksize": bs,
                "double_quant": dq,
            }
    return out, meta


def int8_fixtures(device: str, gen: torch.Generator) -> tuple[dict, dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    out: dict[str, torch.Tensor] = {}
    W = (torch.randn(48, 96, generator=gen) * 0.05).half()
    bias = (torch.randn(48, generator=gen) * 0.1).half()
    x = torch.randn(2, 5, 96, generator=gen).half()
    x[..., [3, 40, 77]] *= 9.0  # outlier feature columns, as LLM.int8() sees in large models
    cb, scb, _ = F.int8_vectorwise_quant(W.to(device))
    xq, xs, _ = F.int8_vectorwise_quant(x.reshape(-1, 96).to(device))
    out.update(W=W, bias=bias, x=x, CB=cb.cpu(), SCB=scb.cpu(), x_q=xq.cpu(), x_scale=xs.cpu())
    for thr in (0.0, 6.0):
        lin = bnb.nn.Linear8bitLt(96, 48, bias=True, has_fp16_weights=False, threshold=thr)
        lin.weight = bnb.nn.Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False)
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
        lin = lin.to(device)
        with torch.no_grad():
            out[f"out_thr{thr:g}"] = lin(x.to(device)).cpu()
    return out, {"threshold_cases": [0.0, 6.0]}


def linear4bit_fixtures(device: str, gen: torch.Generator) -> dict:
    import bitsandbytes as bnb

    out: dict[str, torch.Tensor] = {}
    W = torch.randn(40, 130, generator=gen) * 0.05
    bias = torch.randn(40, generator=gen) * 0.1
    x = torch.randn(3, 4, 130, generator=gen)
    out.update(W=W, bias=bias, x=x)
    for qt in ("nf4", "fp4"):
        for cd in (torch.float32, torch.bfloat16):
            lin = bnb.nn.Linear4bit(130, 40, bias=True, compute_dtype=cd, compress_statistics=True, quant_type=qt)
            lin.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type=qt, compress_statistics=True)
            lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
            lin = _plain_cpu_path(lin.to(device))
            with torch.no_grad():
                out[f"out_{qt}_{str(cd).removeprefix('torch.')}"] = lin(x.to(device)).cpu()
    return out


def _plain_cpu_path(model: torch.nn.Module) -> torch.nn.Module:
    """Keep bitsandbytes' CPU backend off its AVX512-BF16 repacking (bf16 absmax), so outputs are the format's."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def tiny_checkpoints(root: Path, device: str, gen: torch.Generator, suffix: str = "") -> dict:
    """A tiny Llama (nf4 + double quant, no biases) and a tiny OPT (int8 and fp4; biases, tied head),
    saved by transformers + bitsandbytes, with input ids and the logits bitsandbytes computes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, OPTConfig

    configs = {
        "llama": LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        ),
        "opt": OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        ),
    }
    jobs = {
        "tiny_llama_nf4_dq": (
            "llama",
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
        ),
        "tiny_opt_fp4": (
            "opt",
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
        ),
        "tiny_opt_int8": ("opt", BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)),
    }
    ids = torch.randint(0, 128, (2, 7), generator=gen)
    io = {"input_ids": ids}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, cfg in configs.items():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            # bitsandbytes computes 8-bit matmuls in fp16: keep the float model in fp16 for int8
            model.save_pretrained(Path(tmp) / arch)
        for name, (arch, qcfg) in jobs.items():
            dtype = torch.float16 if qcfg.load_in_8bit else torch.float32
            model = AutoModelForCausalLM.from_pretrained(
                Path(tmp) / arch, quantization_config=qcfg, device_map=device, dtype=dtype
            )
            dest = root / (name + suffix)
            shutil.rmtree(dest, ignore_errors=True)
            model.save_pretrained(dest)  # before any forward: the CPU backend repacks weights on the first one
            for extra in dest.iterdir():
                if extra.name not in ("model.safetensors", "config.json"):
                    extra.unlink()
            # the logits a user gets from the saved checkpoint, through bitsandbytes' plain (fp32) path
            model = _plain_cpu_path(AutoModelForCausalLM.from_pretrained(dest, device_map=device).eval())
            with torch.no_grad():
                io[f"logits_{name}"] = model(ids.to(device)).logits.float().cpu()
    return io


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/bnb"))
    args = ap.parse_args()
    import bitsandbytes

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    suffix = "" if args.device == "cpu" else "_cuda"
    info = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__, "device": args.device}
    bw, bw_meta = blockwise_fixtures(args.device, gen)
    save_file(bw, root / f"blockwise{suffix}.safetensors", metadata={"cases": json.dumps(bw_meta), **info})
    i8, i8_meta = int8_fixtures(args.device, gen)
    save_file(i8, root / f"int8{suffix}.safetensors", metadata={"cases": json.dumps(i8_meta), **info})
    save_file(linear4bit_fixtures(args.device, gen), root / f"linear4bit{suffix}.safetensors", metadata=info)
    save_file(tiny_checkpoints(root, args.device, gen, suffix), root / f"tiny_io{suffix}.safetensors", metadata=info)
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"wrote fixtures to {root} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
