"""One QLoRA step (nf4 + double quant, LoRA rank 16 on every linear layer of the decoder, AdamW, activation
checkpointing) of random Llama shapes: transformers + bitsandbytes + PEFT against shardq + PEFT, side by side in one
run on one GPU, and shardq with the GPU capped (`--cap-frac` of the model's nf4 bytes) and the other layers streamed.

    python bench/bench_train.py                       # 1.1b and 7b, batch 4 x 512; writes bench/results/train.json
    python bench/bench_train.py --shapes 13b --batch 1 --seq 1024 --contenders shardq,shardq_capped --cap-mb 7629 \
        --name train_13b

The capped run keeps on the GPU the layers the planner's training plan puts there under the cap (`plan_model(...,
training=Training(...))`: adapters and AdamW states, checkpoints, one block's recomputation, the logits' gradient,
two stream slots), streams the others, and reports the allocator's peak against the cap; a cap below the fixed part
gives a "failed: PlanError" row. `--resident N` overrides the planner.

Columns: step time (mean of the timed steps after one warm-up), tokens/s, the allocator's peak during the timed
steps, and for the capped run the cap and the layers left resident. Limits measured in the same run: the bf16 GEMM
rate (a step is at least 6 * params * tokens FLOPs with recomputation: forward, recompute, input gradients) and the
pinned host-to-device bandwidth (the capped run streams each offloaded layer twice per step).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import public_argv  # noqa: E402

SHAPES = {"tiny": (64, 3, 96, 4, 2), "1.1b": (2048, 16, 8192, 32, 4), "7b": (4096, 32, 11008, 32, 32), "13b": (5120, 40, 13824, 40, 40)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 2**20


def llama_config(shape: str) -> transformers.LlamaConfig:
    hidden, layers, inter, heads, kv = SHAPES[shape]
    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                    num_attention_heads=heads, num_key_value_heads=kv,
                                    vocab_size=512 if shape == "tiny" else 32000,
                                    max_position_embeddings=4096, tie_word_embeddings=False)


def build(shape: str, dev: str) -> torch.nn.Module:
    """A random bf16 Llama of `shape` on `dev` (weights N(0, 0.02), norms 1), built without slow init."""
    cfg = llama_config(shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device=dev)
    gen = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02, generator=gen)
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(dev)  # its buffers are computed, not loaded
    return model


def bnb_quantize(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's linears as bitsandbytes Linear4bit (nf4, double quant, bf16 compute), as transformers does."""
    import bitsandbytes as bnb

    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                quant_type="nf4", compress_statistics=True, device="meta")
        new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                       compress_statistics=True).to("cuda")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.is_loaded_in_4bit = True
    return model


def shardq_quantize(model: torch.nn.Module) -> torch.nn.Module:
    from shardq.config import QuantConfig
    from shardq.quant.convert import quantize_model

    return quantize_model(model, QuantConfig(method="nf4", double_quant=True, compute_dtype=torch.bfloat16),
                          skip=["lm_head"])


def stream_layers(model: torch.nn.Module, resident: int, dev: str) -> None:
    """Dispatch: embeddings, norm, head and the first `resident` layers on `dev` (GPU 0; "cpu" for --smoke), the
    other layers streamed from the CPU."""
    from shardq.runtime.dispatch import dispatch_model

    n = len(model.model.layers)
    model.to("cpu")
    home = 0 if dev == "cuda" else "cpu"
    dmap = {"model.embed_tokens": home, "model.rotary_emb": home, "model.norm": home, "lm_head": home}
    dmap.update({f"model.layers.{i}": (home if i < resident else "cpu") for i in range(n)})
    _empty_cache()
    dispatch_model(model, dmap, offload_modes={f"model.layers.{i}": "stream" for i in range(resident, n)} or None)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_time(model, batch: int, seq: int, steps: int, dev: str) -> tuple[float, int]:
    """Mean seconds per step over `steps` timed steps after one warm-up, and the allocator's peak (bytes)."""
    from shardq.training import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, upcast_norms=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)

    def one() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    _sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync()
    return (time.perf_counter() - t0) / steps, torch.cuda.max_memory_allocated() if dev == "cuda" else 0


def nf4_bytes(model: torch.nn.Module) -> int:
    from shardq.quant.linear import memory_footprint

    return memory_footprint(model)


def planned_resident(shape: str, cap_bytes: int, args) -> int:
    """Decoder layers the planner keeps on GPU 0 under `cap_bytes` for this QLoRA step (nf4 + double quant, LoRA
    r=16 on TARGETS, the batch x seq workload; the rest streamed): its training reserve (adapters + AdamW states,
    checkpoints, one block's recomputation, the logits' gradient) and stream slots counted. Raises PlanError
    when even the fixed part does not fit: the row then says so."""
    from shardq.config import QuantConfig
    from shardq.planning import Training
    from shardq.planning.planner import plan_model

    import psutil

    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM._from_config(llama_config(shape), dtype=torch.bfloat16)
    quant = QuantConfig(method="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    host = int(psutil.virtual_memory().available * 0.9)
    plan = plan_model(meta, quant, max_memory={0: cap_bytes, "cpu": host}, device_map="sequential",
                      workload=(args.batch, args.seq), offload_mode="stream", gpus=args.plan_gpus,
                      training=Training(rank=16, target_modules=tuple(TARGETS)))
    return sum(1 for name, dev in plan.device_map.items() if ".layers." in name and dev == 0)


def run_one(shape: str, contender: str, args) -> list:
    dev = args.device
    model = build(shape, dev)
    params = sum(p.numel() for p in model.parameters())
    resident, cap = "", ""
    if contender == "bnb":
        model = bnb_quantize(model)
    else:
        model = shardq_quantize(model)
    weights = nf4_bytes(model)
    if contender == "shardq_capped":
        cap_bytes = int(args.cap_mb * MB) if args.cap_mb else int(args.cap_frac * weights)
        k = args.resident if args.resident is not None else planned_resident(shape, cap_bytes, args)
        del model
        _empty_cache()
        model = shardq_quantize(build(shape, dev))
        stream_layers(model, int(k), dev)
        resident, cap = int(k), round(cap_bytes / MB)
    _empty_cache()
    sec, peak = step_time(model, args.batch, args.seq, args.steps, dev)
    del model
    _empty_cache()
    return [shape, contender, round(sec * 1e3, 1), round(args.batch * args.seq / sec), round(peak / MB),
            round(weights / MB), cap, resident, round(6 * params * args.batch * args.seq / args.gemm_flops * 1e3, 1)]


def gemm_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0)


def h2d_gbps() -> float:
    host = torch.empty(512 * MB, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * host.numel() / (time.perf_counter() - t0) / 1e9


def _merged(path: Path, res: dict) -> dict:
    """`res` plus the rows of an earlier run of the same table on the same GPU for other (shape, contender)
    pairs, so the shapes can be run in separate device calls (each under the 10-minute limit)."""
    if not path.exists():
        return res
    old = json.loads(path.read_text())
    if (old.get("title"), old.get("gpu"), old.get("columns")) != (res["title"], res["gpu"], res["columns"]):
        return res
    done = {tuple(r[:2]) for r in res["rows"]}
    res["rows"] = [r for r in old["rows"] if tuple(r[:2]) not in done] + res["rows"]
    res["command"] = old["command"] + " ; " + res["command"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1.1b,7b")
    p.add_argument("--contenders", default="bnb,shardq,shardq_capped")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cap-frac", type=float, default=0.5, help="GPU cap of the capped run, x the nf4 weight bytes")
    p.add_argument("--cap-mb", type=float, default=None, help="GPU cap of the capped run in MiB (overrides --cap-frac)")
    p.add_argument("--resident", type=int, default=None, help="layers kept on the GPU in the capped run (default: "
                   "as many as fit under the cap next to the peak measured with every layer streamed)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="train", help="benchmark name and JSON file stem (e.g. train_13b for the 13B "
                   "targets, which use another batch and sequence length)")
    p.add_argument("--smoke", action="store_true", help="check the script on the CPU: tiny shape, shardq only, "
                   "1 step, no limits measured (what tests/test_train_bench.py runs)")
    args = p.parse_args()
    if args.smoke:
        args.shapes, args.contenders, args.batch, args.seq, args.steps = "tiny", "shardq,shardq_capped", 2, 16, 1
        args.resident = 1
    elif not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU (--smoke checks the script on the CPU)")
    args.device = "cpu" if args.smoke else "cuda"
    args.plan_gpus = None if torch.cuda.is_available() else "1x80GB"  # --smoke: plan for a hypothetical GPU
    args.gemm_flops, h2d = (1e12, 0.0) if args.smoke else (gemm_flops(), h2d_gbps())
    rows = []
    for shape in args.shapes.split(","):
        for contender in args.contenders.split(","):
            try:
                rows.append(run_one(shape, contender, args))
            except Exception as e:  # a contender failing (e.g. out of memory) is a result too
                if args.smoke:
                    raise
                rows.append([shape, contender, f"failed: {type(e).__name__}: {str(e)[:120]}"] + [""] * 6)
                _empty_cache()
            print(rows[-1], flush=True)
    base = {r[0]: r[2] for r in rows if r[1] == "bnb" and isinstance(r[2], float)}
    for r in rows:
        r.append(round(base[r[0]] / r[2], 2) if r[0] in base and isinstance(r[2], float) else "")
    for r in rows:
        r.append(("yes" if r[4] <= r[6] else "NO") if isinstance(r[6], int) and isinstance(r[4], int) else "")
    cols = ["shape", "contender", "step_ms", "tokens_per_s", "peak_MB", "weights_MB", "cap_MB", "resident_layers",
            "gemm_bound_ms", "speedup_vs_bnb", "peak_within_cap"]
    res = {"benchmark": args.name, "title": f"QLoRA step (nf4+dq, r=16 all linears, batch {args.batch}x{args.seq})",
           "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name() if not args.smoke else "none (smoke)",
           "command": "python " + " ".join(public_argv(sys.argv)), "columns": cols, "rows": rows,
           "notes": [(f"bf16 GEMM 8192^3: {args.gemm_flops / 1e12:.0f} TFLOP/s; gemm_bound_ms = 6*params*tokens at "
                      "that rate (forward, recompute, input gradients)"),
                     f"pinned H2D: {h2d:.1f} GB/s; the capped run streams each non-resident layer twice per step",
                     "both sides: same prep (frozen base, non-reentrant checkpointing, norms not upcast), AdamW"]}
    path = Path(args.out, "train.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_merged(path, res), indent=1))
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(v) for v in r))


if __name__ == "__main__":
    main()
