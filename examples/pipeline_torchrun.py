"""A model split into pipeline stages over several processes (one per GPU, or CPU processes with gloo), launched by
torchrun. Every rank runs this same script: each loads only its stage from the shared checkpoint; rank 0 runs the
forward and generate(), the other ranks serve their stage and exit when rank 0 is done.

    python examples/pipeline_torchrun.py --make ./tiny-llama          # a small random checkpoint to try it on
    torchrun --nproc-per-node 2 examples/pipeline_torchrun.py --ckpt ./tiny-llama --micro-batches 4
    # two hosts with 8 GPUs each (run on both; HOST0 is the first host's address):
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 --rdzv-id job1 \\
        examples/pipeline_torchrun.py --ckpt /shared/llama-70b --quant nf4 --micro-batches 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import shardq  # noqa: E402
from shardq.distributed import Pipeline, format_rank_plan  # noqa: E402


def make_checkpoint(path: Path, layers: int = 8) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512)
    cfg.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    print(f"saved a random {layers}-layer Llama to {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make", type=Path, help="write a small random Llama checkpoint here and stop (one process)")
    p.add_argument("--ckpt", type=Path, help="checkpoint directory (config.json + safetensors), shared by all ranks")
    p.add_argument("--quant", default="none", help="none, int8, nf4 or fp4")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="sequences generated at once (one micro-batch each)")
    args = p.parse_args()
    if args.make:
        make_checkpoint(args.make)
        return
    if args.ckpt is None:
        p.error("give --ckpt DIR (or --make DIR first)")
    gpu = torch.cuda.is_available()
    caps = {int(os.environ.get("LOCAL_RANK", "0")): "70GB"} if gpu else {"cpu": "4GB"}
    model = shardq.meta_model_from_dir(args.ckpt)
    # the one line that differs from a single-process load: distributed=Pipeline(...)
    model = shardq.load_sharded(model, args.ckpt, max_memory=caps, quant=args.quant, progress=False,
                                distributed=Pipeline(micro_batches=args.micro_batches))
    print(format_rank_plan(model.shardq_rank_plan))  # only rank 0 gets here
    ids = torch.randint(1, 2000, (args.batch, 16), generator=torch.Generator().manual_seed(0)).to(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - t0
    print(f"generated {out.shape[0]} x {out.shape[1] - ids.shape[1]} tokens in {seconds:.2f} s "
          f"({out.shape[0] * (out.shape[1] - ids.shape[1]) / seconds:.1f} tokens/s); first row {out[0, -8:].tolist()}")


if __name__ == "__main__":
    main()
