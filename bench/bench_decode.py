"""Decode speed, side by side in one run: ms per generated token of greedy `generate()` for transformers fp16 (eager;
static cache + torch.compile reduce-overhead), transformers + bitsandbytes nf4/int8 (eager), and shardq fp16/nf4/int8
eager and graph-captured (static cache), on Llama-shaped models with random weights built from a transformers config
and saved as sharded safetensors on local disk; the weight-read floor (weight bytes / HBM copy bandwidth measured in
this run) beside each; and 7B nf4 with the GPU capped so about half the layers stream from pinned memory, against
the pinned host-to-device bandwidth measured in this run.

ms/token = (time of generate(new=N+1) - time of generate(new=1)) / N, so prefill and the first token drop out; each
variant is warmed up by one full generate() first (which captures the graphs). Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from results_io import public_argv

from shardq.loading.loader import load_sharded_from_dir
from shardq.runtime.decode import set_graph_decode
from shardq.runtime import fast_decode
from shardq.runtime.fast_decode import fast_state

SHAPES = {"1.1B": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                       num_key_value_heads=8),
          "7B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32)}
VARIANTS = ("hf_fp16", "hf_fp16_compile", "bnb_nf4", "bnb_int8", "sq_fp16", "sq_fp16_graph", "sq_fp16_fast", "sq_nf4",
            "sq_nf4_graph", "sq_nf4_fast", "sq_nf4_fused", "sq_int8", "sq_int8_graph", "sq_int8_fast", "sq_int8_fused")


def build_checkpoint(shape: str, root: Path) -> Path:
    """A Llama-shaped fp16 checkpoint with random weights (made on the GPU), saved in 2 GB shards."""
    path = root / shape
    if (path / "config.json").exists():
        return path
    cfg = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).half()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="2GB")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return path


def hbm_copy_gbps() -> float:
    """Device-to-device copy bandwidth, bytes read + written."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return _rate(lambda: b.copy_(a), 2 * a.numel())


def h2d_pinned_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    b = torch.empty(a.numel(), dtype=torch.uint8, device="cuda")
    return _rate(lambda: b.copy_(a, non_blocking=True), a.numel())


def _rate(fn, nbytes: int, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9


def load_variant(kind: str, path: Path, max_memory: dict | None = None):
    """The model of one variant, on GPU 0."""
    if kind.startswith("hf_"):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map={"": 0})
    if kind.startswith("bnb_"):
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float16) if kind == "bnb_nf4" else \
            transformers.BitsAndBytesConfig(load_in_8bit=True)
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map={"": 0},
                                                                 quantization_config=q)
    quant = kind.split("_")[1]
    model = load_sharded_from_dir(path, dtype=torch.float16, quant=None if quant == "fp16" else quant,
                                  max_memory=max_memory or {0: "70GB"}, progress=False)
    set_graph_decode(model, kind.endswith(("_graph", "_fast", "_fused")), fuse=kind.endswith("_fused"))
    return model


def gen_kwargs(kind: str) -> dict:
    if kind == "hf_fp16_compile":
        return dict(cache_implementation="static", compile_config=transformers.CompileConfig(mode="reduce-overhead"))
    if kind.endswith(("_graph", "_fast", "_fused")):
        return dict(cache_implementation="static")
    return dict(disable_compile=True)


def ms_per_token(model, kind: str, batch: int, new: int) -> float:
    ids = torch.randint(1, 32000, (batch, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(do_sample=False, pad_token_id=0, **gen_kwargs(kind))
    fast_decode.ENABLED = kind.endswith(("_fast", "_fused"))  # *_graph: transformers' loop with per-step graphs

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(new + 1)  # warm-up (captures / compiles)
    long = min(run(new + 1) for _ in range(2))
    short = min(run(1) for _ in range(2))
    return (long - short) / new * 1e3


def decode_path(model) -> str:
    """Which loop served the variant's generate(): shardq's static graph loop, or transformers' loop."""
    if getattr(model, "shardq_runtime", None) is not None and fast_state(model).stats["fast"] > 0:
        return "fast_loop"
    return "transformers"


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if t.device.type in ("cuda", "cpu"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1.1B,7B")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--kinds", default=",".join(VARIANTS))
    ap.add_argument("--kinds-7b", default="hf_fp16,hf_fp16_compile,bnb_nf4,sq_fp16_fast,sq_nf4_graph,sq_nf4_fast,sq_int8_fast")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--stream-7b", action="store_true", help="7B nf4 with half the layers streamed")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", tempfile.gettempdir() + "/shardq_decode"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    hbm, h2d = hbm_copy_gbps(), h2d_pinned_gbps()
    print(f"HBM copy {hbm:.0f} GB/s, pinned H2D {h2d:.1f} GB/s", flush=True)
    rows, notes = [], []
    for shape in args.shapes.split(","):
        path = build_checkpoint(shape, Path(args.dir))
        kinds = (args.kinds if shape != "7B" else args.kinds_7b).split(",")
        for kind in kinds:
            if kind.startswith("bnb_") and not _has_bnb():
                notes.append(f"{kind} skipped: bitsandbytes not importable")
                continue
            try:
                model = load_variant(kind, path)
                wb = weight_bytes(model)
                for batch in map(int, args.batches.split(",")):
                    if getattr(model, "shardq_runtime", None) is not None:
                        fast_state(model).stats["fast"] = 0
                    ms = ms_per_token(model, kind, batch, args.new)
                    floor = wb / (hbm * 1e9) * 1e3  # HBM traffic of a copy (read + write) ~ the rate of a pure read
                    rows.append([shape, kind, batch, round(ms, 3), round(floor, 3), round(ms / floor, 2),
                                 round(wb / 2**20),
                                 decode_path(model)])
                    print(rows[-1], flush=True)
            except Exception as e:  # one variant failing must not lose the others' numbers
                notes.append(f"{shape} {kind} failed: {type(e).__name__}: {str(e)[:300]}")
                print(notes[-1], flush=True)
            model = None
            gc.collect()
            torch.cuda.empty_cache()
            write(args, rows, notes, hbm, h2d, quiet=True)  # a run cut short keeps what it measured
        if shape == "7B" and args.stream_7b:
            rows.append(stream_row(path, h2d, args.new))
    write(args, rows, notes, hbm, h2d)


def stream_row(path: Path, h2d: float, new: int) -> list:
    """7B nf4 with the GPU capped at about half its nf4 weights: the rest streams from pinned memory."""
    model = load_sharded_from_dir(path, dtype=torch.float16, quant="nf4", max_memory={0: "2.6GB", "cpu": "60GB"},
                                  progress=False)
    set_graph_decode(model, True)
    streamed = model.shardq_plan.forward_cost().pcie_bytes
    ms = ms_per_token(model, "sq_nf4_graph", 1, new // 2)
    bound = streamed / (h2d * 1e9) * 1e3
    row = ["7B", "sq_nf4_graph_half_streamed", 1, round(ms, 3), round(bound, 3), round(ms / bound, 2) if bound else 0,
           round(streamed / 2**20), decode_path(model)]
    print(row, flush=True)
    return row


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def write(args, rows: list, notes: list, hbm: float, h2d: float, quiet: bool = False) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = [f"HBM copy bandwidth {hbm:.0f} GB/s (read + write); floor = weight bytes / copy bandwidth",
             f"pinned H2D {h2d:.1f} GB/s; the streamed row's floor is its streamed bytes per token / that bandwidth",
             "ms/token = (generate(N+1) - generate(1)) / N, greedy, prompt 16 tokens, best of 2 after a warm-up",
             "path: fast_loop = shardq's static graph loop (whole token step one CUDA graph, EOS checked every 16 "
             "tokens; the *_fast variants, *_fused: its step compiled by inductor first); transformers = transformers' generate loop (with the per-step "
             "GraphDecoder for *_graph)",
             f"torch {torch.__version__}, transformers {transformers.__version__}"] + notes
    res = {"benchmark": "decode", "title": "Decode ms per token: transformers, bitsandbytes and shardq eager/graph",
           "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
           "command": "python " + " ".join(public_argv(sys.argv)), "notes": notes,
           "columns": ["model", "variant", "batch", "ms_per_token", "floor_ms", "x_floor", "weights_MiB", "path"],
           "rows": rows}
    (out / "decode.json").write_text(json.dumps(res, indent=1))
    if quiet:
        return
    print("\n".join(notes))
    print(f"{'model':<6}{'variant':<28}{'batch':>6}{'ms/tok':>9}{'floor':>8}{'x':>7}  path")
    for r in rows:
        print(f"{r[0]:<6}{r[1]:<28}{r[2]:>6}{r[3]:>9}{r[4]:>8}{r[5]:>7}  {r[7]}")


if __name__ == "__main__":
    main()
