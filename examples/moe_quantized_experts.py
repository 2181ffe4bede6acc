"""A Mixtral-style MoE model loaded in nf4 with its fused experts quantized, next to what stays when they are not
(what transformers + bitsandbytes gives: experts in their float dtype).

The checkpoint is written in the per-expert layout of the Hub (`block_sparse_moe.experts.N.w1/w2/w3`); shardq
fuses the experts as transformers 5 does while streaming them in, and quantizes each expert on load. Runs on one
GPU, or on the CPU alone.

    python examples/moe_quantized_experts.py [--quant nf4] [--layers 4] [--experts 8]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

import shardq  # noqa: E402
from shardq.memory import format_size  # noqa: E402
from shardq.quant.experts import QuantizedExperts  # noqa: E402


def save(path: Path, layers: int, experts: int) -> MixtralForCausalLM:
    """A random bf16 Mixtral-style checkpoint (sharded, per-expert tensors); returns the model."""
    cfg = MixtralConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=8,
                        num_key_value_heads=4, num_local_experts=experts, num_experts_per_tok=2, vocab_size=8000,
                        max_position_embeddings=512)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(path, max_shard_size="50MB")
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="nf4", help="int8, nf4 or fp4")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    device = 0 if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "mixtral"
        ref = save(ckpt, args.layers, args.experts)
        caps = {device: "8GB"} | ({} if device == "cpu" else {"cpu": "8GB"})
        plans = {name: shardq.plan(str(ckpt), quant, max_memory=caps)
                 for name, quant in [("bf16", "none"), (f"{args.quant}, experts float", shardq.QuantConfig(
                     args.quant, skip_modules=["experts"])), (f"{args.quant}, experts quantized", args.quant)]}
        for name, p in plans.items():
            print(f"{name:>26}: {format_size(p.total_bytes)} of weights")
        model = shardq.load_sharded(shardq.meta_model_from_dir(ckpt), ckpt, max_memory=caps, quant=args.quant,
                                    progress=False)
        stacks = sum(isinstance(m, QuantizedExperts) for m in model.modules())
        print(f"\nloaded: {stacks} expert stacks quantized; footprint {format_size(shardq.memory_footprint(model))}")
        ids = torch.randint(0, 8000, (1, 16), generator=torch.Generator().manual_seed(1))
        same = shardq.quantize_model(copy.deepcopy(ref).float(), args.quant)  # as the CPU computes it: fp32
        with torch.inference_mode():
            got = model(input_ids=ids.to(model.device)).logits.float().cpu()
            want = ref(input_ids=ids).logits.float()
            mine = same(input_ids=ids).logits.float()
        rel = ((got - want).norm() / want.norm()).item()
        diff = ((got - mine).norm() / mine.norm()).item()
        print(f"logits vs the bf16 model: relative error {rel:.3f} (the quantization's); vs the same quantization "
              f"applied in memory and computed in fp32: {diff:.2g} (fp32 rounding on the CPU; bf16 compute on a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
