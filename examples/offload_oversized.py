"""A model larger than the GPU cap (or, without a GPU, the CPU cap), run with CPU and disk offload.

The checkpoint is a sharded safetensors directory; the model is built on the meta device from its config.json,
so neither the host nor the GPU ever holds the whole float model. Blocks that do not fit the GPU cap go to the
CPU (streamed to the GPU for each forward, packed) and, past the CPU cap, to disk (read ahead from the offload
folder). Runs on one GPU, or on the CPU alone.

    python examples/offload_oversized.py [--quant nf4] [--gpu-cap 300MB] [--cpu-cap 250MB] [--layers 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import shardq  # noqa: E402
from shardq.runtime.dispatch import format_memory_report  # noqa: E402
from shardq.runtime.dispatch import memory_report  # noqa: E402
from shardq.memory import format_size  # noqa: E402
from shardq.planning.report import format_plan  # noqa: E402


def save(path: Path, layers: int) -> int:
    """A random Llama-style checkpoint; returns its bytes."""
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=16000)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(path, max_shard_size="100MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="nf4", help="none, int8, nf4 or fp4")
    ap.add_argument("--gpu-cap", default="300MB", help="max_memory of GPU 0 (ignored without a GPU)")
    ap.add_argument("--cpu-cap", default="250MB", help="max_memory of the CPU; the rest goes to disk")
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model"
        size = save(ckpt, args.layers)
        caps = ({0: args.gpu_cap} if gpu else {}) | {"cpu": args.cpu_cap, "disk": "50GB"}
        print(f"checkpoint: {format_size(size)} fp16; max_memory={caps}; quant={args.quant}")
        t0 = time.perf_counter()
        model = shardq.load_sharded(shardq.meta_model_from_dir(ckpt, dtype=torch.float16), ckpt, max_memory=caps,
                                    quant=args.quant, offload_dir=Path(tmp) / "offload", workload=(1, 128))
        print(f"loaded in {time.perf_counter() - t0:.2f} s\n")
        print(format_plan(model.shardq_plan))
        x = torch.randint(0, 16000, (1, 32), generator=torch.Generator().manual_seed(1))
        x = x.cuda() if gpu else x
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(x, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
            took = time.perf_counter() - t0
        print(f"\ngenerated {out[0, 32:].tolist()} in {took:.2f} s ({took / 8 * 1e3:.0f} ms per token)\n")
        print(format_memory_report(memory_report(model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
