#!/usr/bin/env python3
"""Pipeline stages over torch.distributed on the CPU: wall time of one prefill forward (batch of sequences) of a
12-layer Llama through 2 and 3 ranks (gloo, one thread per rank, each pinned to a core), with 8 micro-batches vs
the same ranks without micro-batching, vs one process; the cost model's prediction next to each measurement.

    python bench/bench_pipeline.py [--batch 8 --tokens 128 --hidden 256 --reps 3] [--paper]

Per-block times come from one process (hooks around each block at the micro-batch size and the whole batch),
the link's latency and rate from a gloo ping-pong between rank 0 and rank 1 of the same run. Writes
bench/results/pipeline.json and prints the table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import transformers  # noqa: E402

import shardq  # noqa: E402
from shardq.distributed import Pipeline  # noqa: E402
from shardq.distributed.cost import BlockTime, Link, predict, roofline_time  # noqa: E402
from shardq.distributed.stages import split_model  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from results_io import public_argv  # noqa: E402

MICRO = 8


def save_model(path: Path, hidden: int, layers: int = 12) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64,
                                   vocab_size=2048, max_position_embeddings=1024)
    cfg.architectures = ["LlamaForCausalLM"]
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def inputs(batch: int, tokens: int) -> torch.Tensor:
    return torch.randint(1, 2000, (batch, tokens), generator=torch.Generator().manual_seed(0))


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def block_times(model: torch.nn.Module, ids: torch.Tensor, sizes: tuple[int, int], reps: int):
    """Per-unit BlockTime and the skeleton's overhead, fitted from the median times at two batch sizes."""
    names = [n for n, _ in model.named_modules() if n.count(".") <= 2 and (".layers." in n or n in (
        "model.embed_tokens", "model.norm", "lm_head"))]
    spent: dict[str, float] = {}
    starts: dict[str, float] = {}
    for n in names:
        mod = model.get_submodule(n)
        mod.register_forward_pre_hook(lambda m, a, n=n: starts.__setitem__(n, time.perf_counter()))
        mod.register_forward_hook(lambda m, a, o, n=n: spent.__setitem__(n, spent.get(n, 0) + time.perf_counter()
                                                                              - starts[n]))
    per: dict[int, dict[str, float]] = {}
    total: dict[int, float] = {}
    for b in sizes:
        runs = []
        for _ in range(reps + 1):
            spent.clear()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(ids[:b], use_cache=False)
            runs.append((time.perf_counter() - t0, dict(spent)))
        runs = sorted(runs[1:], key=lambda r: r[0])
        total[b], per[b] = runs[len(runs) // 2]
    tokens = [b * ids.shape[1] for b in sizes]
    times = {n: BlockTime.fit(tokens[0], per[sizes[0]][n], tokens[1], per[sizes[1]][n]) for n in names}
    over = [total[b] - sum(per[b].values()) for b in sizes]
    return times, BlockTime.fit(tokens[0], over[0], tokens[1], over[1]), total


def ping_pong(rank: int, nbytes: int, reps: int = 20) -> float:
    """Median one-way time of an `nbytes` message between rank 0 and rank 1."""
    buf = torch.zeros(max(1, nbytes // 4))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        out.append((time.perf_counter() - t0) / 2)
    return statistics.median(out)


def physical_cores() -> list[int]:
    """One logical CPU per physical core among those this process may use (hyperthread siblings share a core's
    units: two ranks pinned to siblings would run one after the other)."""
    seen, out = set(), []
    for cpu in sorted(os.sched_getaffinity(0)):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except OSError:
            key = ("", str(cpu))
        if key not in seen:
            seen.add(key)
            out.append(cpu)
    return out


def rank_main(rank: int, world: int, port: int, path: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    cores = physical_cores()
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    small, big = ping_pong(rank, 64), ping_pong(rank, 4 << 20)
    model = shardq.load_sharded(shardq.meta_model_from_dir(path), path, max_memory={"cpu": "4GB"}, progress=False,
                                distributed=Pipeline(exit_workers=False))
    pipe = model.shardq_pipeline
    if rank > 0:
        pipe.serve()
        dist.destroy_process_group()
        return
    ids = inputs(args.batch, args.tokens)
    result = {"link_latency": small, "link_gbps": (4 << 20) / max(big - small, 1e-9) / 1e9,
              "stages": [len(s.blocks) for s in model.shardq_rank_plan.stages]}
    for m in (1, MICRO):
        pipe.micro_batches = m
        with torch.no_grad():
            result[f"m{m}"] = timed(lambda: model(ids, use_cache=False), args.reps)
    pipe.shutdown()
    Path(out).write_text(json.dumps(result))


def run_job(world: int, path: Path, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        mp.start_processes(rank_main, args=(world, port, str(path), args, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def single(path: Path, args: argparse.Namespace, threads: int) -> tuple[float, dict, BlockTime]:
    torch.set_num_threads(threads)
    model = shardq.load_sharded_from_dir(path, max_memory={"cpu": "4GB"}, progress=False)
    ids = inputs(args.batch, args.tokens)
    with torch.no_grad():
        wall = timed(lambda: model(ids, use_cache=False), args.reps)
    if threads != 1:
        return wall, {}, BlockTime(0.0)
    times, overhead, _ = block_times(model, ids, (args.batch // MICRO, args.batch), args.reps)
    return wall, times, overhead


# --- on paper: Llama-70B in nf4 on 2 hosts x 8 H100s (assumptions stated in the JSON notes)
HBM_GBPS = 2000.0  # nf4 weight streaming measured by this repo's kernels on an H100 (README: 8192x28672 M=1 in 65 us)
TFLOPS = 400.0  # fused-dequant / dequant + cuBLAS fp16 at prefill sizes (README: ~440 TFLOP/s wgmma at large M)
BLOCK_FIXED = 30e-6  # kernel launches of one decoder layer
HOST_OVERHEAD = 1.0e-3  # per rank and micro-batch: transformers' forward skeleton + ~75 stubs (~13 us each, measured)
NVLINK = (150.0, 10e-6)  # GB/s, latency: NCCL send/recv between GPUs of one host
NETS = {"100 Gb/s": (12.5, 20e-6), "400 Gb/s": (50.0, 20e-6)}


def llama70b() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


def paper_70b() -> dict:
    """Predicted TTFT and tokens/s of Llama-70B nf4, one rank per H100, on 1 host x 8 and 2 hosts x 8."""
    from shardq.distributed.stages import plan_ranks

    model = llama70b()
    params = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n, _ in model.named_modules()
              if n.startswith("model.layers.") and n.count(".") == 2 or n == "lm_head"}
    rows = []
    cases = [("decode", 1, 1, 1), ("decode", 16, 1, 1), ("decode", 16, 1, 0), ("decode", 64, 1, 0),
             ("prefill (TTFT)", 1, 2048, 1), ("prefill", 16, 2048, 16)]  # 0: one micro-batch per rank
    for hosts, net in [(1, "NVLink only")] + [(2, n) for n in NETS]:
        world = 8 * hosts
        rp = plan_ranks(model, [{0: 80 * 10**9 - 768 * 2**20}] * world, "nf4", workload=(4, 2048))
        times = {u: roofline_time(params.get(u, 0), nb, HBM_GBPS, TFLOPS, BLOCK_FIXED)
                 for u, nb in rp.unit_bytes.items() if u in params}
        inter = Link(*NETS[net]) if hosts == 2 else Link(*NVLINK)
        links = [inter if (r + 1) % 8 == 0 else Link(*NVLINK) for r in range(world)]
        for what, batch, tokens, m in cases:
            m = m or world
            pred = predict(rp, times, links, batch=batch, tokens=tokens, micro_batches=m,
                           overhead=BlockTime(HOST_OVERHEAD))
            rate = batch * (1 if what == "decode" else tokens) / pred.seconds
            rows.append([f"{hosts} x 8 H100", net, what, batch, tokens, m, round(pred.seconds * 1e3, 1),
                         round(rate, 1), pred.bottleneck])
    counts = sorted({len(s.blocks) for s in rp.stages})
    notes = [f"Llama-70B (80 layers, hidden 8192, vocab 128256) nf4 planned by plan_ranks, one rank per GPU "
             f"(2 x 8: {counts} layers per rank; the fp16 head, 2.1 GB read per step, on the last rank with fewer)",
             f"block time = {BLOCK_FIXED * 1e6:.0f} us + max(weights / {HBM_GBPS:.0f} GB/s, 2 x params x tokens / "
             f"{TFLOPS:.0f} TFLOP/s); {HOST_OVERHEAD * 1e3:.1f} ms host work per rank and micro-batch",
             f"links: NVLink {NVLINK[0]:.0f} GB/s + {NVLINK[1] * 1e6:.0f} us within a host; between hosts "
             + ", ".join(f"{k} = {v[0]} GB/s + {v[1] * 1e6:.0f} us" for k, v in NETS.items())
             + "; the last rank returns logits to rank 0 over the inter-host link",
             "decode rows: tokens/s of one step (one new token per sequence; micro-batches = ranks keeps every stage "
             "busy, more would re-read the weights per micro-batch); prefill rows: prompt tokens/s",
             "not modelled: KV-cache reads in attention (small at these lengths), NCCL stream overlap of host work"]
    return {"benchmark": "pipeline_70b", "title": "Cost model: Llama-70B nf4 over pipeline stages (on paper)",
            "date": datetime.date.today().isoformat(), "gpu": "none (predicted for H100 80GB)",
            "command": "python bench/bench_pipeline.py --paper",
            "columns": ["hosts", "inter-host link", "phase", "batch", "tokens", "micro-batches", "ms",
                        "tokens/s", "bottleneck"], "rows": rows, "notes": notes}


def write(doc: dict, folder: Path = ROOT / "bench" / "results") -> None:
    out = folder / f"{doc['benchmark']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print("\n".join(doc["notes"]))
    print(" | ".join(doc["columns"]))
    for r in doc["rows"]:
        print(" | ".join(str(v) for v in r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper", action="store_true", help="only the cost model's Llama-70B figures (no run)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder of the JSON result")
    args = p.parse_args()
    if args.paper:
        write(paper_70b(), args.out)
        return
    cores = len(physical_cores())
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(Path(tmp) / "llama12", args.hidden)
        one, times, overhead = single(path, args, 1)
        one_all, _, _ = single(path, args, cores)
        meta = shardq.meta_model_from_dir(path)
        rows, notes = [], []
        for world in (2, 3):
            got = run_job(world, path, args)
            rp = split_model(meta, [{"cpu": 1}] * world, stages=got["stages"])
            link = Link(got["link_gbps"], got["link_latency"])
            procs = [r % cores for r in range(world)]
            for m in (1, MICRO):
                pred = predict(rp, times, [link] * world, batch=args.batch, tokens=args.tokens, micro_batches=m,
                               overhead=overhead, logits_positions=args.tokens, processors=procs)
                rows.append([world, m, round(got[f"m{m}"] * 1e3, 1), round(pred.seconds * 1e3, 1),
                             round(got[f"m{m}"] / pred.seconds, 2), round(got[f"m{m}"] / got["m1"], 2),
                             round(got[f"m{m}"] / one, 2), round(one / min(world, cores) * 1e3, 1)])
            notes.append(f"{world} ranks: stages {got['stages']} blocks; gloo link {got['link_gbps']:.2f} GB/s, "
                         f"{got['link_latency'] * 1e6:.0f} us latency (ping-pong, same run)")
    notes += [f"one process: {one * 1e3:.1f} ms with 1 thread, {one_all * 1e3:.1f} ms with {cores} threads",
              f"{cores} physical cores ({len(os.sched_getaffinity(0))} logical CPUs), one rank pinned per core: ranks beyond {cores} share a core (rank r on core r % {cores}); the physical limit "
              "column is one process's 1-thread time / min(ranks, cores)",
              "prediction: cost.predict with per-block times fitted in one process at 1 and 8 sequences, "
              "processors = cores"]
    if one_all > one / min(cores, 2) * 1.2:
        notes.append(f"WARNING: {cores} threads took {one_all / one:.2f}x the 1-thread time: the cores are shared with "
                     "other work, so these timings do not test the cost model; rerun on an idle host")
    columns = ["ranks", "micro-batches", "measured ms", "predicted ms", "measured/predicted", "vs same ranks M=1",
               "vs one process (1 thread)", "physical limit ms"]
    doc = {"benchmark": "pipeline", "title": f"Pipeline stages over gloo, 12-layer Llama (hidden {args.hidden}), "
           f"prefill of {args.batch} x {args.tokens} tokens, fp32 CPU", "date": datetime.date.today().isoformat(),
           "gpu": "none (CPU)", "command": "python bench/bench_pipeline.py " + " ".join(public_argv(sys.argv[1:])),
           "columns": columns, "rows": rows, "notes": notes}
    write(doc, args.out)


if __name__ == "__main__":
    main()
