"""One Mixtral-shaped MoE experts layer (8 experts, hidden 4096, intermediate 14336, top-2, random router), side by
side in one run: shardq nf4 through the grouped 4-bit matmul, shardq nf4 through the old path (the eager loop,
each hit expert dequantized whole), transformers' bf16 experts (grouped_mm, batched_mm where it fits, eager).

    python bench/bench_moe.py --tokens 1,16,512            # GPU: writes bench/results/moe.json (and $OUT/results/)
    python bench/bench_moe.py --smoke                      # CPU, tiny shapes, reference op: checks the script runs

ms: CUDA events, median of --reps after a warm-up; graph_ms: the same call captured in a CUDA graph and replayed
(null where the path syncs with the host and cannot be captured). floor_ms: the bytes of the experts the batch hits
(nf4: packed weights + scales; bf16: the weights) over the device-to-device copy bandwidth measured in the same run.
At 512 tokens the shardq grouped row is the op's eager routing (per expert through gemm_4bit, more than 32 rows per
expert); its graph_ms and the sq_nf4_grouped_kernel row are the one-launch kernel.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_io
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's shardq

from shardq.config import QuantConfig  # noqa: E402
from shardq.kernels import cuda_ops  # noqa: E402
from shardq.quant import experts as qexperts  # noqa: E402

FULL = dict(hidden=4096, inter=14336, experts=8, top_k=2)
SMOKE = dict(hidden=256, inter=512, experts=4, top_k=2)
COLUMNS = ["tokens", "variant", "ms", "graph_ms", "floor_ms", "x_floor", "hit_MiB", "rel_err", "path"]


def layer(dims: dict, device: str) -> nn.Module:
    """A transformers MixtralExperts module with random bf16 weights (std 0.02)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = transformers.MixtralConfig(hidden_size=dims["hidden"], intermediate_size=dims["inter"],
                                     num_local_experts=dims["experts"], num_experts_per_tok=dims["top_k"])  # fmt: skip
    with torch.device(device):
        mod = MixtralExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.02)
    return mod.eval()


def quantized(mod: nn.Module) -> nn.Module:
    """A copy of the layer with both stacks nf4 `QuantizedExperts` (shardq's experts implementation)."""
    q = copy.copy(mod)
    q._parameters, q._modules = dict(mod._parameters), dict(mod._modules)
    for attr in ("gate_up_proj", "down_proj"):
        w = q._parameters[attr].detach()
        new = qexperts.QuantizedExperts(*w.shape, QuantConfig(method="nf4"), device="meta", dtype=w.dtype)
        qexperts.replace_stack(q, attr, new.load_from_float(w))
    return q


def with_impl(mod: nn.Module, name: str) -> nn.Module:
    m = copy.copy(mod)
    m.config = copy.copy(mod.config)
    m.config._experts_implementation_internal = name
    if name.startswith("shardq"):
        qexperts.register_implementations()
    return m


def routed(tokens: int, dims: dict, device: str, g: torch.Generator) -> tuple:
    """Hidden states and a random router's top-k (indices, softmax weights), as MixtralSparseMoeBlock gives them."""
    h = torch.randn(tokens, dims["hidden"], generator=g, device=device).to(torch.bfloat16)
    logits = torch.randn(tokens, dims["experts"], generator=g, device=device)
    w, idx = torch.topk(torch.softmax(logits, -1), dims["top_k"], dim=-1)
    return h, idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def timed_ms(fn, reps: int, cuda: bool) -> float:
    """Median ms of fn() after two warm-up calls (CUDA events on the GPU, the wall clock on the CPU)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn, reps: int) -> float | None:
    """Median replay ms of fn() captured in a CUDA graph; None if it cannot be captured (a host sync)."""
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return timed_ms(graph.replay, reps, True)


def copy_gbps(device: str) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    x = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    y = torch.empty_like(x)
    ms = timed_ms(lambda: y.copy_(x), 10, device == "cuda")
    return 2 * n / (ms / 1e3) / 1e9


def hit_bytes(mod: nn.Module, idx: torch.Tensor, quant: bool) -> int:
    """Bytes of the experts idx hits: nf4 packed weights + scales, or bf16 weights."""
    hit = len(torch.unique(idx))
    total = 0
    for attr in ("gate_up_proj", "down_proj"):
        s = getattr(mod, attr)
        if quant:
            total += sum(t[0].numel() * t.element_size() for _, t in s.named_buffers() if t.dim() >= 1)
        else:
            total += s[0].numel() * s.element_size()
    return hit * total


def variants(dims: dict, device: str, tokens: int) -> dict[str, tuple[str, str, str]]:
    """name -> (module kind, experts implementation, path description) timed at this token count."""
    grouped = qexperts.IMPLEMENTATION if device == "cuda" else qexperts.GROUPED
    out = {
        "sq_nf4_grouped": ("nf4", grouped, "shardq::grouped_gemm_4bit, op routing"),
        "sq_nf4_old": ("nf4", "eager", "eager loop, each hit expert dequantized whole + F.linear"),
        "hf_bf16_grouped_mm": ("bf16", "grouped_mm", "transformers grouped_mm"),
        "hf_bf16_eager": ("bf16", "eager", "transformers eager loop"),
    }
    if tokens * dims["top_k"] > cuda_ops.GROUPED_MAX_AVG_ROWS * dims["experts"]:
        out["sq_nf4_grouped_kernel"] = ("nf4", grouped, "shardq::grouped_gemm_4bit, one-launch kernel forced")
    if tokens * dims["top_k"] <= 32:  # batched_mm gathers a weight copy per (token, expert) pair
        out["hf_bf16_batched_mm"] = ("bf16", "batched_mm", "transformers batched_mm")
    return out


def measure(mods: dict, tokens: int, dims: dict, args, bw: float) -> list[list]:
    """Rows for one token count: every variant on the same routed batch."""
    cuda = args.device == "cuda"
    h, idx, w = routed(tokens, dims, args.device, torch.Generator(device=args.device).manual_seed(tokens))
    rows, outs = [], {}
    for name, (kind, impl, path) in variants(dims, args.device, tokens).items():
        mod = with_impl(mods[kind], impl)
        forced = name.endswith("_kernel")
        saved = cuda_ops.GROUPED_MAX_AVG_ROWS
        cuda_ops.GROUPED_MAX_AVG_ROWS = 10**9 if forced else saved
        try:
            with torch.no_grad():
                outs[name] = mod(h, idx, w)
                ms = timed_ms(lambda: mod(h, idx, w), args.reps, cuda)
                capturable = cuda and impl != "eager"  # the eager loops sync (nonzero) every call
                gms = graph_ms(lambda: mod(h, idx, w), args.reps) if capturable else None
        except Exception as exc:  # a path the installed versions lack: one row saying so
            rows.append([tokens, name, None, None, None, None, None, None, f"{path}: {type(exc).__name__}: {exc}"])
            continue
        finally:
            cuda_ops.GROUPED_MAX_AVG_ROWS = saved
        nbytes = hit_bytes(mods[kind], idx, kind == "nf4")
        floor = nbytes / (bw * 1e9) * 1e3
        best = min(v for v in (ms, gms) if v is not None)
        rows.append([tokens, name, round(ms, 4), None if gms is None else round(gms, 4), round(floor, 4),
                     round(best / floor, 2), round(nbytes / 2**20, 1), None, path])  # fmt: skip
    for r in rows:
        ref = outs.get("sq_nf4_old" if r[1].startswith("sq") else "hf_bf16_eager")
        if r[1] in outs and ref is not None:
            a, b = outs[r[1]].double(), ref.double()
            r[7] = float(f"{((a - b).norm() / b.norm()).item():.2e}")
    return rows


def headline(rows: list[list], dims: dict) -> str:
    """notes[0]: the grouped nf4 layer against bf16 grouped_mm and the old nf4 path at each token count."""
    parts = []
    for t in dict.fromkeys(r[0] for r in rows):
        best = {r[1]: min(v for v in (r[2], r[3]) if v is not None) for r in rows if r[0] == t and r[2] is not None}
        sq, hf, old = best.get("sq_nf4_grouped"), best.get("hf_bf16_grouped_mm"), best.get("sq_nf4_old")
        if sq is None:
            continue
        vs = [f"bf16 grouped_mm {hf:.3f} ({hf / sq:.1f}x)" if hf else "", f"old nf4 {old:.3f}" if old else ""]
        parts.append(f"{t} tok: {sq:.3f} ms ({', '.join(v for v in vs if v)})")
    shape = f"{dims['experts']} experts {dims['hidden']}x{dims['inter']}, top-{dims['top_k']}"
    return f"MoE experts layer ({shape}), shardq nf4 grouped ms: " + "; ".join(parts)


def write_json(rows: list[list], info: dict, out_dir: Path | None = None) -> Path:
    """bench/results/moe.json (and $OUT/results/moe.json on a lent GPU)."""
    from results_io import write_result

    notes = [
        headline(rows, info["dims"]),
        f"copy bandwidth {info['copy_GBps']:.0f} GB/s (read + write, same run); floor = bytes of the experts hit / it",
        "ms: CUDA events after warm-up, median; graph_ms: captured and replayed (null: the path syncs with the host)",
        "rel_err: against sq_nf4_old (nf4 rows) or hf_bf16_eager (bf16 rows) on the same batch",
        f"torch {torch.__version__}, transformers {info['transformers']}; dims {info['dims']}",
    ]
    title = "MoE experts layer (Mixtral-shaped): shardq nf4 grouped vs old path vs transformers bf16"
    return write_result("moe", title, COLUMNS, rows, notes, out_dir=out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,16,512", help="tokens per layer call, comma-separated")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, the reference op; writes only to --out")
    ap.add_argument("--out", type=Path, default=None, help="directory for moe.json (default bench/results/)")
    args = ap.parse_args(argv)
    import transformers

    args.device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    dims = SMOKE if args.smoke else FULL
    tokens = [int(t) for t in args.tokens.split(",")] if not args.smoke else [1, 4, 32]
    bw = copy_gbps(args.device)
    bf16 = layer(dims, args.device)
    mods = {"bf16": bf16, "nf4": quantized(bf16)}
    rows = []
    for t in tokens:
        rows += measure(mods, t, dims, args, bw)
        for r in rows[-len(variants(dims, args.device, t)) :]:
            print(r, flush=True)
    info = {"copy_GBps": bw, "transformers": transformers.__version__, "dims": dims}
    if not args.smoke or args.out is not None:
        print("wrote", write_json(rows, info, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
