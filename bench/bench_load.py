"""Load-time benchmark: shardq.load_sharded vs transformers from_pretrained (+ accelerate + bitsandbytes).

One run, one machine. Saves a Llama-style fp16 checkpoint (the anchor's 1.9 GB config, or 3.8 GB with --size large;
sharded at 500 MB),
then loads it in a fresh subprocess per case under the same `max_memory` cap and quantization:
  load time (imports done before the clock starts); peak host RSS above the process's RSS before loading (sampled every 2 ms) next to the bytes the
  model holds in host memory afterwards; the allocator's peak on GPU 0 while loading and during a 512-token
  prefill, against the cap; ms per generated token.
Run on a lent GPU:  python bench/bench_load.py [--size small|anchor|large] [--cap 600MB] [--cases a,b]
(writes $OUT/bench_load.json)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CASES = {
    # name: (loader, quantization, fp32 CPU offload)
    "hf_nf4_fp32cpu": ("hf", "nf4", True),
    "shardq_nf4_fp32cpu": ("shardq", "nf4", True),
    "shardq_nf4_stream": ("shardq", "nf4", False),
    "hf_int8_fp32cpu": ("hf", "int8", True),
    "shardq_int8_fp32cpu": ("shardq", "int8", True),
    "shardq_int8_stream": ("shardq", "int8", False),
}


SIZES = {  # name: (hidden, intermediate, layers, heads, vocab)
    "small": (512, 1408, 4, 8, 8000),  # 60 MB smoke test
    "anchor": (2048, 5632, 16, 16, 32000),  # 1.9 GB, the anchor's config
    "large": (4096, 11008, 8, 32, 32000),  # 3.8 GB: Llama-7B-wide layers
}


def llama_config(size: str):
    from transformers import LlamaConfig

    h, i, n, heads, v = SIZES[size]
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=v)


def save_checkpoint(path: Path, size: str) -> float:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(size)).to(torch.float16)
    model.save_pretrained(path, max_shard_size="100MB" if size == "small" else "500MB")
    return sum(p.numel() * 2 for p in model.parameters()) / 1e9


class RssSampler:
    """Peak resident set size of this process while running, sampled in a thread."""

    def __init__(self, every: float = 0.002) -> None:
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self) -> "RssSampler":
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def bnb_config(method: str, fp32_cpu: bool):
    import torch
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=fp32_cpu)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
                              llm_int8_enable_fp32_cpu_offload=fp32_cpu)


def load(case: str, ckpt: Path, caps: dict, offload_dir: Path):
    import torch

    loader, method, fp32_cpu = CASES[case]
    q = bnb_config(method, fp32_cpu)
    if loader == "hf":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float16, device_map="auto", max_memory=caps,
                                                quantization_config=q).eval()
    from shardq.loading.loader import load_sharded_from_dir

    return load_sharded_from_dir(ckpt, dtype=torch.float16, max_memory=caps, quant=q, offload_dir=offload_dir,
                                 workload=(1, 512), progress=False).eval()


def host_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    rt = getattr(model, "shardq_runtime", None)
    if rt is not None and rt.streamer is not None:  # pinned host copies of streamed blocks
        total += sum(b.nbytes for b in rt.streamer.blocks.values() if hasattr(b, "buffer"))
    return total


def run_case(case: str, ckpt: Path, cap: str) -> dict:
    """One case in this (fresh) process."""
    import torch

    caps = {0: cap, "cpu": "100GB"}
    import bitsandbytes  # noqa: F401  (imports outside the timed load, for both stacks)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import shardq.loading.loader  # noqa: F401
    ids = torch.randint(0, 8000, (1, 512), generator=torch.Generator().manual_seed(1))
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # CUDA context outside the measurement
    torch.cuda.reset_peak_memory_stats(0)
    with tempfile.TemporaryDirectory() as off, RssSampler() as rss:
        t0 = time.perf_counter()
        model = load(case, ckpt, caps, Path(off))
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
    r = {"case": case, "load_s": round(load_s, 3), "cap_MB": cap,
         "host_peak_over_base_MB": round((rss.peak - rss.base) / 1e6, 1),
         "host_held_MB": round(host_bytes(model) / 1e6, 1),
         "gpu_load_peak_MB": round(torch.cuda.max_memory_allocated(0) / 1e6, 1)}
    stats = getattr(model, "shardq_load_stats", None)
    if stats is not None:  # where shardq's time went: streaming tensors in vs placing blocks (dispatch)
        r.update(stream_s=round(stats.seconds, 3), dispatch_s=round(stats.dispatch_seconds, 3),
                 pinned_staging_MB=round(stats.pinned_bytes / 1e6, 1))
    with torch.inference_mode():
        torch.cuda.reset_peak_memory_stats(0)
        model(ids.cuda(), use_cache=False)
        torch.cuda.synchronize()
        r["gpu_prefill512_peak_MB"] = round(torch.cuda.max_memory_allocated(0) / 1e6, 1)
        x = ids[:, :16].cuda()
        kw = dict(do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
        model.generate(x, max_new_tokens=2, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 8
        model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        r["token_ms"] = round((time.perf_counter() - t0) / n * 1e3, 1)
    return r


def table(rows: list[dict], cap_mb: float) -> str:
    cols = ["case", "load_s", "host_peak_over_base_MB", "host_held_MB", "gpu_load_peak_MB", "gpu_prefill512_peak_MB",
            "token_ms"]
    out = [" | ".join(cols) + " | load peak/cap | prefill peak/cap", "|".join("---" for _ in range(len(cols) + 2))]
    for r in rows:
        if "error" in r:
            out.append(f"{r['case']} | error: {r['error'][:160]}")
            continue
        ratios = [f"{r[k] / cap_mb:.2f}" for k in ("gpu_load_peak_MB", "gpu_prefill512_peak_MB")]
        out.append(" | ".join(str(r[c]) for c in cols) + " | " + " | ".join(ratios))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="anchor", help="checkpoint size (small: smoke test)")
    ap.add_argument("--cap", default="600MB", help="max_memory of GPU 0 (default the seed's 600MB)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, Path(args.ckpt), args.cap)), flush=True)
        return 0
    from shardq.memory import parse_size

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        gb = save_checkpoint(ckpt, args.size)
        print(f"checkpoint: {gb:.2f} GB fp16 in {len(list(ckpt.glob('*.safetensors')))} shards", flush=True)
        for case in args.cases.split(","):
            res = subprocess.run([sys.executable, __file__, "--case", case, "--ckpt", str(ckpt), "--cap", args.cap],
                                 capture_output=True, text=True, timeout=600)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
            rows.append(json.loads(line[7:]) if line else {"case": case, "error": (res.stderr or res.stdout)[-600:]})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(os.environ.get("OUT", "/tmp")) / "bench_load.json"
    out.write_text(json.dumps({"checkpoint_GB_fp16": gb, "cap": args.cap, "rows": rows}, indent=1))
    if args.size != "small":
        print("results:", write_json(rows, args, gb, parse_size(args.cap) / 1e6))
    print(table(rows, parse_size(args.cap) / 1e6))
    return 0


def write_json(rows: list[dict], args: argparse.Namespace, gb: float, cap_mb: float) -> str:
    """bench/results/load.json (load_<size>.json for other sizes): one row per case, GPU peaks against the cap."""
    from results_io import write_result

    def peak(r: dict, key: str) -> str | None:
        return f"{r[key]:g} ({r[key] / cap_mb:.2f})" if key in r else None

    out = [[r["case"], r.get("load_s"), r.get("host_peak_over_base_MB"), peak(r, "gpu_load_peak_MB"),
            peak(r, "gpu_prefill512_peak_MB"), r.get("token_ms", r.get("error", "")[-120:] or None)] for r in rows]
    cols = ["case", "load s", "host peak over base MB", "GPU peak loading MB (× cap)",
            "GPU peak 512-token prefill MB (× cap)", "ms/token"]
    best = min((r for r in rows if "gpu_prefill512_peak_MB" in r), key=lambda r: r["gpu_prefill512_peak_MB"],
               default=None)
    worst = max((r for r in rows if "gpu_prefill512_peak_MB" in r), key=lambda r: r["gpu_prefill512_peak_MB"],
                default=None)
    head = (f"{gb:.2f} GB checkpoint under {{0: \"{args.cap}\"}}: prefill peak {worst['case']} "
            f"{peak(worst, 'gpu_prefill512_peak_MB')}, {best['case']} {peak(best, 'gpu_prefill512_peak_MB')}"
            if best and worst else f"{gb:.2f} GB checkpoint under {{0: \"{args.cap}\"}}: no case completed")
    name = "load" if args.size == "anchor" else f"load_{args.size}"
    title = f"Loading a {gb:.2f} GB fp16 Llama checkpoint under max_memory={{0: \"{args.cap}\"}}, workload 1×512"
    return str(write_result(name, title, cols, out, [head, "Each case runs in a fresh process; imports before the clock."]))


if __name__ == "__main__":
    sys.exit(main())
