"""CPU-offload streaming: shardq vs accelerate `cpu_offload`, against pinned host-to-device bandwidth, one run.

An 8-layer Llama-style fp16 model (hidden 4096, 3.76 GB, as shared/anchors/peer_bench.py) lives in host
memory; each 1-token forward (no KV cache) streams every weight to the GPU. Reported: per-token latency,
effective rate (bytes streamed / latency) and its ratio to the pinned H2D bandwidth measured here; the same
with 4-bit (NF4) blocks streamed packed; shardq without prefetch, to show what the overlap buys.

    python bench/bench_offload.py            # writes $OUT/bench_offload.json (or /tmp) and prints a table
    python bench/bench_offload.py --small    # a tiny model: a smoke test of this script (runs without a GPU)
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUT = os.environ.get("OUT", "/tmp")
DEV = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
SMALL = "--small" in sys.argv


def bench_ms(fn, reps: int, warm: int) -> float:
    """Median CUDA-event time of `fn()` in ms (host clock without a GPU)."""
    for _ in range(warm):
        fn()
    if DEV.type == "cpu":
        return statistics.median(_host_times(fn, reps))
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def _host_times(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def pinned_h2d_gbps() -> float:
    """Pinned host→device copy rate of 1 GiB (the physical limit of CPU offload)."""
    if DEV.type == "cpu":
        return float("nan")
    h = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    h.random_(0, 255)
    d = torch.empty_like(h, device=DEV)
    t = bench_ms(lambda: d.copy_(h, non_blocking=True), reps=10, warm=2)
    return (1 << 30) / (t / 1e3) / 1e9


def build_model(layers: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    if SMALL:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=1000)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with DEV:
            model = LlamaForCausalLM(cfg).eval()  # initialised on the GPU: seconds instead of minutes on the CPU
    finally:
        torch.set_default_dtype(prev)
    return model


def block_map(model, device) -> dict:
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    names += [f"model.layers.{i}" for i in range(len(model.model.layers))]
    return {n: device for n in names}


def forward(model, ids):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


def relerr(a, b) -> float:
    return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 6)


def run_shardq(model_cpu, ids, ref, prefetch: bool, reps: int) -> dict:
    from shardq.runtime.dispatch import dispatch_model

    t0 = time.perf_counter()
    model = dispatch_model(model_cpu, block_map(model_cpu, "cpu"), offload_modes="stream",
                           execution_device=0 if DEV.type == "cuda" else None, prefetch=prefetch)
    setup_s = time.perf_counter() - t0
    st = model.shardq_runtime.streamer
    nbytes = sum(b.nbytes for b in st.blocks.values())
    gpu = DEV.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(DEV)
    base = torch.cuda.memory_allocated(DEV) if gpu else 0
    out = forward(model, ids)
    t = bench_ms(lambda: forward(model, ids), reps=reps, warm=2)
    peak = torch.cuda.max_memory_allocated(DEV) - base if gpu else 0
    return {"token_ms": round(t, 2), "streamed_GB": round(nbytes / 1e9, 3),
            "eff_GBps": round(nbytes / (t / 1e3) / 1e9, 2),
            "relerr": relerr(out, ref), "setup_s": round(setup_s, 2),
            "slot_MB": round(sum(s.buffer.numel() for s in st.slots) / 1e6, 1),
            "peak_extra_alloc_MB": round(peak / 1e6, 1), "model": model}


def run_accelerate(model_cpu, ids, ref, nbytes: int) -> dict:
    from accelerate import cpu_offload

    cpu_offload(model_cpu, execution_device=DEV)
    out = forward(model_cpu, ids)
    t = bench_ms(lambda: forward(model_cpu, ids), reps=5, warm=1)
    return {"token_ms": round(t, 1), "eff_GBps": round(nbytes / (t / 1e3) / 1e9, 2), "relerr": relerr(out, ref)}


def run_4bit(gpu_model, ids, reps: int) -> dict:
    """NF4 layers (lm_head kept fp16 as bitsandbytes does): resident on the GPU, then streamed packed."""
    from shardq.config import QuantConfig
    from shardq.quant.convert import quantize_model

    cfg = QuantConfig(method="nf4", compute_dtype=torch.float16)
    qmodel = quantize_model(gpu_model, cfg, skip=["lm_head"])  # quantized on the GPU
    ref = forward(qmodel, ids)
    resident = bench_ms(lambda: forward(qmodel, ids), reps=20, warm=3)
    qmodel.to("cpu")
    _empty_cache()
    res = run_shardq(qmodel, ids, ref, prefetch=True, reps=reps)
    res.pop("model")
    res["gpu_resident_token_ms"] = round(resident, 2)
    return res


def _empty_cache() -> None:
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu"}
    res["h2d_pinned_GBps"] = round(pinned_h2d_gbps(), 1)
    print("pinned H2D GB/s:", res["h2d_pinned_GBps"], flush=True)
    gpu_model = build_model()
    nbytes = sum(p.numel() * p.element_size() for p in gpu_model.parameters())
    res["param_GB"] = round(nbytes / 1e9, 3)
    ids = torch.randint(0, gpu_model.config.vocab_size, (1, 1), device=DEV)
    ref = forward(gpu_model, ids)
    res["gpu_resident_token_ms"] = round(bench_ms(lambda: forward(gpu_model, ids), reps=30, warm=5), 2)
    for name, prefetch, reps in (("shardq_stream", True, 20), ("shardq_stream_noprefetch", False, 10)):
        try:
            r = run_shardq(copy.deepcopy(gpu_model).to("cpu"), ids, ref, prefetch, reps)
            r.pop("model")
            r["frac_of_pinned_h2d"] = round(r["eff_GBps"] / res["h2d_pinned_GBps"], 3)
            res[name] = r
        except Exception as e:  # keep the other measurements
            res[name] = {"error": repr(e)[:300]}
        print(name, res[name], flush=True)
        gc.collect()
        _empty_cache()
    try:
        res["accelerate_cpu_offload"] = run_accelerate(copy.deepcopy(gpu_model).to("cpu"), ids, ref, nbytes)
    except Exception as e:
        res["accelerate_cpu_offload"] = {"error": repr(e)[:300]}
    print("accelerate", res["accelerate_cpu_offload"], flush=True)
    gc.collect()
    _empty_cache()
    try:
        res["shardq_stream_nf4"] = run_4bit(gpu_model, ids, reps=20)
    except Exception as e:
        res["shardq_stream_nf4"] = {"error": repr(e)[:300]}
    print("nf4", res["shardq_stream_nf4"], flush=True)
    with open(os.path.join(OUT, "bench_offload.json"), "w") as f:
        json.dump(res, f, indent=1)
    if DEV.type == "cuda" and not SMALL:
        print("results:", write_json(res))
    print_table(res)


RUNS = (("shardq_stream", "shardq stream (pinned blocks, side-stream prefetch)"),
        ("shardq_stream_noprefetch", "shardq stream, prefetch=False"),
        ("accelerate_cpu_offload", "accelerate cpu_offload"),
        ("shardq_stream_nf4", "shardq stream, nf4 layers streamed packed (lm_head fp16)"))


def write_json(res: dict) -> str:
    """bench/results/offload.json: one row per run, its rate against the pinned H2D bandwidth of this run."""
    from results_io import write_result

    h2d, rows = res["h2d_pinned_GBps"], []
    for key, label in RUNS:
        r = res.get(key, {})
        gbps = r.get("eff_GBps")
        rows.append([label, r.get("token_ms"), r.get("streamed_GB", res["param_GB"]), gbps,
                     round(100 * gbps / h2d, 1) if gbps else None, r.get("relerr", r.get("error"))])
    sq, ac = res.get("shardq_stream", {}), res.get("accelerate_cpu_offload", {})
    ratio = f"{ac['token_ms'] / sq['token_ms']:.1f}× faster" if "token_ms" in sq and "token_ms" in ac else "n/a"
    notes = [f"CPU-offloaded fp16 Llama ({res['param_GB']} GB): shardq {sq.get('token_ms')} ms/token, accelerate "
             f"cpu_offload {ac.get('token_ms')} ms ({ratio})",
             f"Pinned H2D bandwidth in the same run: {h2d} GB/s; GPU-resident: {res['gpu_resident_token_ms']} ms/token; "
             f"torch {res['torch']}."]
    title = f"CPU-offloaded fp16 Llama ({res['param_GB']} GB) in host memory, 1-token forward on GPU 0"
    cols = ["run", "ms/token", "GB moved/token", "effective GB/s", "% of pinned H2D", "rel. err vs GPU-resident"]
    return str(write_result("offload", title, cols, rows, notes))


def print_table(res: dict) -> None:
    h2d = res["h2d_pinned_GBps"]
    print(f"\n{res['gpu']}, torch {res['torch']}; model {res['param_GB']} GB fp16; pinned H2D {h2d} GB/s; "
          f"GPU-resident token {res['gpu_resident_token_ms']} ms")
    print(f"{'run':<28}{'token ms':>10}{'GB moved':>10}{'GB/s':>8}{'of H2D':>8}{'relerr':>10}")
    for name in ("shardq_stream", "shardq_stream_noprefetch", "accelerate_cpu_offload", "shardq_stream_nf4"):
        r = res.get(name, {})
        if "error" in r:
            print(f"{name:<28} error: {r['error'][:80]}")
            continue
        moved = r.get("streamed_GB", res["param_GB"])
        gbps = r.get("eff_GBps", 0)
        print(f"{name:<28}{r.get('token_ms', 0):>10}{moved:>10}{gbps:>8}{gbps / h2d:>8.1%}{r.get('relerr', 0):>10}")
    sq, ac = res.get("shardq_stream", {}), res.get("accelerate_cpu_offload", {})
    if "token_ms" in sq and "token_ms" in ac:
        print(f"shardq vs accelerate cpu_offload: {ac['token_ms'] / sq['token_ms']:.1f}x faster per token")


if __name__ == "__main__":
    main()
