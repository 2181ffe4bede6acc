"""Two GPUs under the seed's limits {0: "600MB", 1: "1GB"}: a 1.9 GB fp16 Llama-style model loaded in int8 and
in nf4, with the allocator's peak per GPU while loading and during a 512-token prefill, and generate() compared
with the same model on one GPU.

    python examples/two_gpu_seed_limits.py [--quant int8,nf4] [--small]

Needs two CUDA GPUs (the transformers + accelerate + bitsandbytes stack overshot these same caps by up to 47 %
while loading: shared/anchors/hf_multi_gpu_2xh200_2026-11-23.json).
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
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import shardq  # noqa: E402
from shardq.runtime.dispatch import format_memory_report  # noqa: E402
from shardq.runtime.dispatch import memory_report  # noqa: E402
from shardq.memory import parse_size  # noqa: E402
from shardq.planning.report import format_plan  # noqa: E402

CAPS = {0: "600MB", 1: "1GB"}


def save(path: Path, small: bool) -> None:
    layers, hidden, inter = (4, 1024, 2816) if small else (16, 2048, 5632)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(path, max_shard_size="500MB")


def peaks() -> dict[int, int]:
    return {i: torch.cuda.max_memory_allocated(i) for i in range(2)}


def reset() -> None:
    for i in range(2):
        torch.cuda.synchronize(i)
        torch.cuda.reset_peak_memory_stats(i)


def generate(model) -> torch.Tensor:
    x = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(3)).cuda()
    return model.generate(x, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(x),
                          pad_token_id=0).cpu()


def run(ckpt: Path, method: str) -> None:
    bnb = BitsAndBytesConfig(load_in_8bit=True) if method == "int8" else \
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
    reset()
    t0 = time.perf_counter()
    model = shardq.load_sharded(shardq.meta_model_from_dir(ckpt, dtype=torch.float16), ckpt, max_memory=CAPS,
                                quant=bnb, workload=(1, 512))
    load_s = time.perf_counter() - t0
    load_peak = peaks()
    print(format_plan(model.shardq_plan))
    ids = torch.randint(0, 32000, (1, 512), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.inference_mode():
        reset()
        model(ids, use_cache=False)
        prefill_peak = peaks()
        split = generate(model)
    print(format_memory_report(memory_report(model)))
    del model
    torch.cuda.empty_cache()
    one = shardq.load_sharded(shardq.meta_model_from_dir(ckpt, dtype=torch.float16), ckpt, max_memory={0: "20GB"},
                              quant=bnb, progress=False)
    with torch.inference_mode():
        same = torch.equal(split, generate(one))
    del one
    torch.cuda.empty_cache()
    print(f"\n{method}: loaded in {load_s:.2f} s; generate() on 2 GPUs equals 1 GPU: {same}")
    for i in range(2):
        cap = parse_size(CAPS[i])
        print(f"  GPU {i}: cap {cap / 1e6:.0f} MB, peak while loading {load_peak[i] / 1e6:.1f} MB "
              f"({load_peak[i] / cap:.0%}), during the 512-token prefill {prefill_peak[i] / 1e6:.1f} MB "
              f"({prefill_peak[i] / cap:.0%})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int8,nf4")
    ap.add_argument("--small", action="store_true", help="a 0.3 GB model instead of 1.9 GB")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        print(f"this example needs 2 CUDA GPUs, found {torch.cuda.device_count()}: run "
              "examples/offload_oversized.py on one GPU or the CPU instead")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "llama"
        save(ckpt, args.small)
        for method in args.quant.split(","):
            run(ckpt, method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
