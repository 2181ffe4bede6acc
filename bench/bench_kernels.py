"""Side-by-side benchmark of shardq's quantized matmuls against fp16 cuBLAS and bitsandbytes, in one run.

    python bench/bench_kernels.py [--shapes 4096x4096,...] [--ms 1,2,...] [--out DIR]

For every K×N and M: fp16 `nn.Linear` (cuBLAS), shardq Linear4bit nf4 (± double quant; plus sq_nf4_v1: the fallback
K-split small-M kernel forced for M <= 32; sq_nf4_tc: the tensor-core ring kernel for M <= 16 (GEMV_MAX_M), where
the default is the register-streaming GEMV; sq_nf4_deq: M > 32 through dequantize + cuBLAS, where the default on
Hopper is the fused-dequant wgmma kernel (csrc/gemm_4bit_wgmma.cu) for 32 < M <= 128 on wide grids; sq_nf4_wg: that
kernel forced for every M > 32) and Linear8bit (threshold 6 and 0; plus sq_int8_t6_gemv: threshold 6 with
the int8 tensor-core kernel switched off, the dp4a GEMV it replaced for 2 <= M <= 32; sq_int8_t6_fused /
sq_int8_t0_fused: the one-launch kernel forced for M <= 4, where the default is the prepare step + the tensor-core
kernel from M = 2), bitsandbytes 0.50.2 Linear4bit / Linear8bitLt with the same settings (if importable). Opt-in,
fp32 compute dtype (bitsandbytes' default): sq_nf4_c32 / bnb_nf4_c32 are nf4 layers with compute_dtype=float32 fed
fp16 x, as a model loaded with a default BitsAndBytesConfig runs them; sq_nf4_c32_deq is sq_nf4_c32 with the fp32
kernel switched off (dequantize-to-fp32 + cuBLAS, the path before it). Inputs carry 8
outlier feature columns scaled ×20 (as the peer benchmark shared/anchors/peer_bench.py). Each contender is timed
  - as a module call: CUDA events around one call, Python launch cost included, median of 30;
  - graph-captured: a CUDA graph of back-to-back calls, replay time / calls, median of 5 replays;
rotating over enough weight copies (≥ 2× L2) that weights stream from HBM, not L2. Effective weight GB/s =
stored weight bytes / graph time. The HBM copy bandwidth (read + write of 1 GiB) is measured in the same run.
Writes kernels_bench.json and kernels_bench.md under --out ($OUT or /tmp) and prints a compact table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shardq.config import QuantConfig  # noqa: E402
from shardq.kernels import cuda_ops  # noqa: E402
from shardq.quant.linear import Linear4bit  # noqa: E402
from shardq.quant.linear import Linear8bit  # noqa: E402

DEV = torch.device("cuda")
SHAPES = "4096x4096,4096x11008,11008x4096,8192x28672,4097x1000"
MS = "1,2,7,16,32,256,4096"
ROTATE_BYTES = 2 * 50 * 2**20
# kinds timed with one explicit small-M 4-bit variant (cuda_ops.GEMM4_VARIANT), and the largest M each applies to
VARIANT_MAX_M = {"sq_nf4_v1": 32}
# kinds timed with the register-streaming GEMV switched off (cuda_ops.GEMM4_GEMV): the ring kernel it replaced
GEMV_OFF_MAX_M = {"sq_nf4_tc": cuda_ops.GEMV_MAX_M}
# kinds timed with the int8 tensor-core kernel switched off (cuda_ops.INT8_TC), over the M range it serves
INT8_TC_OFF = {"sq_int8_t6_gemv": (cuda_ops.INT8_TC_MIN_M, cuda_ops.INT8_TC_MAX_M)}
# kinds timed with the one-launch int8 kernel forced (cuda_ops.INT8_FUSED_MAX_M) over the M it computes
INT8_FUSED_ON = {"sq_int8_t6_fused": 4, "sq_int8_t0_fused": 4}
# kinds timed with the Hopper fused-dequant kernel switched off (cuda_ops.GEMM4_WGMMA): dequantize + cuBLAS, the
# large-M path it replaced, over the M it serves
WGMMA_OFF_MIN_M = {"sq_nf4_deq": cuda_ops.SMALL_M + 1}
# kinds timed with the Hopper fused-dequant kernel forced for every M > 32 and grid (the op routes only part to it)
WGMMA_FORCED = {"sq_nf4_wg"}
# kinds timed with the fp32-activation kernel switched off (cuda_ops.GEMM4_F32)
F32_OFF = {"sq_nf4_c32_deq"}
# timed only when --kinds names them
OPT_IN = {"sq_nf4_wg", "sq_int8_t6_gemv", "sq_nf4_tc", "sq_nf4_c32", "sq_nf4_c32_deq", "bnb_nf4_c32",
          *INT8_FUSED_ON}


def events_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def hbm_copy_gbps() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV).random_(0, 255)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    t = events_ms(lambda: y.copy_(x), 20)
    del x, y
    return 2 * (1 << 30) / (t / 1e3) / 1e9


def weight_bytes(mod: nn.Module) -> int:
    """Bytes of the stored weight and its statistics (not bias)."""
    total = 0
    for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
        if name != "bias":
            total += t.numel() * t.element_size()
    qs = getattr(getattr(mod, "weight", None), "quant_state", None)
    if qs is not None:  # bitsandbytes keeps absmax in the quant state
        total += qs.absmax.numel() * qs.absmax.element_size()
        if getattr(qs, "state2", None) is not None:
            total += qs.state2.absmax.numel() * 4 + 256 * 4
    scb = getattr(getattr(mod, "weight", None), "SCB", None)
    if scb is not None and not any(t is scb for t in mod.buffers()):
        total += scb.numel() * scb.element_size()
    return total


def build(kind: str, w: torch.Tensor):
    """One module of `kind` holding weight `w` (fp16 [N, K] on the CPU), on the GPU."""
    n, k = w.shape
    lin = nn.Linear(k, n, bias=False, dtype=torch.float16)
    lin.weight.data.copy_(w)
    if kind == "fp16":
        return lin.to(DEV)
    c32 = torch.float32 if "_c32" in kind else None
    if kind.startswith("sq_nf4"):  # sq_nf4_vN: same module, timed with small-M kernel variant N (VARIANT_MAX_M)
        cfg = QuantConfig(method="nf4", double_quant="_dq" in kind, compute_dtype=c32)
        return Linear4bit.from_linear(lin.to(DEV), cfg)
    if kind.startswith("sq_int8"):
        thr = 6.0 if "_t6" in kind else 0.0
        return Linear8bit.from_linear(lin.to(DEV), QuantConfig(method="int8", threshold=thr))
    import bitsandbytes as bnb

    if kind.startswith("bnb_nf4"):
        dq = kind.endswith("_dq")
        m = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=c32 or torch.float16, compress_statistics=dq,
                              quant_type="nf4")
        m.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=dq, quant_type="nf4")
        return m.to(DEV)
    thr = 6.0 if kind.endswith("t6") else 0.0
    m = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=thr)
    m.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return m.to(DEV)


def time_kind(mods: list, x: torch.Tensor, capture: bool = True) -> dict:
    with torch.inference_mode():
        out = mods[0](x)
        i = [0]

        def call():
            mods[i[0] % len(mods)](x)
            i[0] += 1

        for _ in range(3):
            call()
        res = {"module_us": events_ms(call, 30) * 1e3, "out": out}
        calls = max(2 * len(mods), 20)
        if not capture:
            res["graph_error"] = "not attempted here (see graph_probe)"
            return res
        try:
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for j in range(calls):
                    mods[j % len(mods)](x)
            g.replay()
            res["graph_us"] = events_ms(g.replay, 5) * 1e3 / calls
        except Exception as exc:  # some peers cannot be captured (host syncs)
            res["graph_error"] = repr(exc)[:120]
            print(f"  graph capture failed: {res['graph_error']}", flush=True)
            torch.cuda.synchronize()
    return res


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_shape(k: int, n: int, ms: list[int], kinds: list[str]) -> list[dict]:
    rows = [{"K": k, "N": n, "M": m} for m in ms]
    default_variant, default_tc = cuda_ops.GEMM4_VARIANT, cuda_ops.INT8_TC
    default_fused = cuda_ops.INT8_FUSED_MAX_M
    default_gemv, default_f32, default_wgmma = cuda_ops.GEMM4_GEMV, cuda_ops.GEMM4_F32, cuda_ops.GEMM4_WGMMA
    default_wgmma_max, default_wgmma_fill = cuda_ops.WGMMA_MAX_M, cuda_ops.WGMMA_MIN_FILL
    g = torch.Generator(device=DEV).manual_seed(k * 31 + n)

    def weight():
        return (torch.randn(n, k, generator=g, device=DEV) * 0.02).half().cpu()

    for kind in kinds:
        first = build(kind, weight())
        copies = max(1, min(16, math.ceil(ROTATE_BYTES / max(1, weight_bytes(first)))))
        mods = [first] + [build(kind, weight()) for _ in range(copies - 1)]
        ref_mod = build("fp16", first.dequantize().weight.data.cpu()) if hasattr(first, "dequantize") else None
        for row in rows:
            if kind in VARIANT_MAX_M and row["M"] > VARIANT_MAX_M[kind]:
                continue
            if kind in INT8_TC_OFF and not INT8_TC_OFF[kind][0] <= row["M"] <= INT8_TC_OFF[kind][1]:
                continue
            if kind in INT8_FUSED_ON and row["M"] > INT8_FUSED_ON[kind]:
                continue
            if kind in GEMV_OFF_MAX_M and row["M"] > GEMV_OFF_MAX_M[kind]:
                continue
            if kind in WGMMA_OFF_MIN_M and row["M"] < WGMMA_OFF_MIN_M[kind]:
                continue
            if kind in WGMMA_FORCED and row["M"] <= cuda_ops.SMALL_M:
                continue
            cuda_ops.GEMM4_WGMMA = kind not in WGMMA_OFF_MIN_M and default_wgmma
            cuda_ops.WGMMA_MAX_M = 1 << 30 if kind in WGMMA_FORCED else default_wgmma_max
            cuda_ops.WGMMA_MIN_FILL = 0.0 if kind in WGMMA_FORCED else default_wgmma_fill
            cuda_ops.GEMM4_GEMV = kind not in GEMV_OFF_MAX_M and default_gemv
            cuda_ops.GEMM4_F32 = kind not in F32_OFF and default_f32
            cuda_ops.GEMM4_VARIANT = int(kind[-1]) if kind in VARIANT_MAX_M else default_variant
            cuda_ops.INT8_TC = kind not in INT8_TC_OFF and default_tc
            cuda_ops.INT8_FUSED_MAX_M = INT8_FUSED_ON.get(kind, default_fused)
            x = torch.randn(row["M"], k, device=DEV, generator=g).half()  # private generator: not graph-registered
            x[:, :: max(1, k // 8)] *= 20.0
            try:
                r = time_kind(mods, x, capture=kind != "bnb_int8_t6")
            except Exception as exc:
                row[kind + "_error"] = repr(exc)[:160]
                continue
            row[kind + "_us"] = round(r["module_us"], 1)
            if "graph_us" in r:
                row[kind + "_graph_us"] = round(r["graph_us"], 1)
            else:
                row[kind + "_graph_error"] = r["graph_error"]
            t = r.get("graph_us", r["module_us"])
            row[kind + "_GBps"] = round(weight_bytes(first) / (t / 1e6) / 1e9, 1)
            if ref_mod is not None:
                with torch.inference_mode():
                    row[kind + "_relerr_vs_deq"] = round(rel_err(r["out"], ref_mod(x)), 5)
        cuda_ops.GEMM4_VARIANT, cuda_ops.INT8_TC, cuda_ops.GEMM4_GEMV = default_variant, default_tc, default_gemv
        cuda_ops.GEMM4_F32, cuda_ops.INT8_FUSED_MAX_M = default_f32, default_fused
        cuda_ops.GEMM4_WGMMA = default_wgmma
        cuda_ops.WGMMA_MAX_M, cuda_ops.WGMMA_MIN_FILL = default_wgmma_max, default_wgmma_fill
        del mods, first, ref_mod
        torch.cuda.empty_cache()
    return rows


# contender -> column label, in table order
LABELS = dict([("fp16", "fp16"), ("sq_nf4", "sq nf4"), ("sq_nf4_dq", "sq nf4dq"), ("sq_nf4_deq", "sq nf4 deq"),
          ("sq_nf4_wg", "sq nf4 wgmma"),
          ("sq_nf4_v1", "sq nf4 v1"),
          ("sq_nf4_tc", "sq nf4 ring"),
          ("bnb_nf4", "bnb nf4"), ("bnb_nf4_dq", "bnb nf4dq"),
          ("sq_nf4_c32", "sq nf4 c32"), ("sq_nf4_c32_deq", "sq nf4 c32 deq"), ("bnb_nf4_c32", "bnb nf4 c32"),
          ("sq_int8_t6", "sq i8t6"), ("sq_int8_t6_gemv", "sq i8t6 gemv"),
          ("bnb_int8_t6", "bnb i8t6"),
          ("sq_int8_t6_fused", "sq i8t6 fused"), ("sq_int8_t0", "sq i8t0"),
          ("sq_int8_t0_fused", "sq i8t0 fused"),
          ("bnb_int8_t0", "bnb i8t0")])
KIND_ORDER = list(LABELS)


def table(rows: list[dict], hbm: float) -> str:
    cols = [(k, LABELS[k]) for k in KIND_ORDER]
    cols = [c for c in cols if any(c[0] + "_us" in r for r in rows)]  # contenders of this run only
    head = "| K×N | M | " + " | ".join(c[1] + " µs call/graph" for c in cols)
    head += " | nf4 GB/s (% HBM) | fp16/nf4 | fp16/i8t6 |"
    lines = [head, "|" + "---|" * (len(cols) + 5)]
    for r in rows:
        cells = []
        for key, _ in cols:
            call, gr = r.get(key + "_us"), r.get(key + "_graph_us")
            cells.append("–" if call is None else f"{call:g} / {gr:g}" if gr is not None else f"{call:g} / –")
        t16 = r.get("fp16_graph_us") or r.get("fp16_us")
        tq = r.get("sq_nf4_graph_us") or r.get("sq_nf4_us")
        t8 = r.get("sq_int8_t6_graph_us") or r.get("sq_int8_t6_us")
        gbps = r.get("sq_nf4_GBps")
        extra = [f"{gbps:g} ({100 * gbps / hbm:.0f}%)" if gbps else "–",
                 f"{t16 / tq:.2f}" if t16 and tq else "–", f"{t16 / t8:.2f}" if t16 and t8 else "–"]
        lines.append(f"| {r['K']}×{r['N']} | {r['M']} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def write_json(res: dict, rows: list[dict]) -> Path:
    """bench/results/kernels.json: graph µs per contender (module-call µs where a graph cannot capture it)."""
    from results_io import write_result

    kinds = list(dict.fromkeys(k[:-3] for r in rows for k in r if k.endswith("_us") and not k.endswith("_graph_us")))
    cols = ["K×N", "M"] + [k + (" graph µs" if any(k + "_graph_us" in r for r in rows) else " call µs") for k in kinds]
    cols += ["sq_nf4 % of HBM copy", "fp16 / sq_nf4", "fp16 / sq_int8_t6"]
    out = []
    for r in rows:
        cells = [r.get(k + "_graph_us", r.get(k + "_us")) for k in kinds]
        t16, tq, t8 = (r.get(k + "_graph_us") or r.get(k + "_us") for k in ("fp16", "sq_nf4", "sq_int8_t6"))
        gbps = r.get("sq_nf4_GBps")
        out.append([f"{r['K']}×{r['N']}", r["M"], *cells, round(100 * gbps / res["hbm_copy_GBps"], 1) if gbps else None,
                    round(t16 / tq, 2) if t16 and tq else None, round(t16 / t8, 2) if t16 and t8 else None])
    notes = [f"HBM copy bandwidth in the same run: {res['hbm_copy_GBps']} GB/s; torch {res['torch']}"
             + (f", bitsandbytes {res['bnb']}" if "bnb" in res else " (bitsandbytes absent)") + ".",
             "µs per matmul, CUDA-graph replay where it captures (bitsandbytes' int8 threshold-6 layer cannot).",
             "History and analysis: bench/history/kernels.md."]
    return write_result("kernels", "Quantized matmuls against fp16 cuBLAS and bitsandbytes", cols, out, notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--ms", default=MS)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--kinds", help="comma-separated subset of the contenders (default: all but the opt-in kernels "
                                    f"{sorted(OPT_IN)})")
    args = ap.parse_args(argv)
    import shardq.kernels

    if not shardq.kernels.available():
        print("shardq kernels unavailable: the numbers would be the reference path", file=sys.stderr)
        return 1
    kinds = ["fp16", "sq_nf4", "sq_nf4_dq", "sq_nf4_deq", "sq_nf4_wg", "sq_nf4_v1", "sq_nf4_tc",
             "sq_nf4_c32", "sq_nf4_c32_deq", "sq_int8_t6", "sq_int8_t6_gemv", "sq_int8_t6_fused",
             "sq_int8_t0", "sq_int8_t0_fused"]
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__,
           "command": " ".join(["python", "bench/bench_kernels.py", *(argv or sys.argv[1:])])}
    if not args.no_bnb:
        try:
            import bitsandbytes as bnb

            res["bnb"] = bnb.__version__
            kinds += ["bnb_nf4", "bnb_nf4_dq", "bnb_nf4_c32", "bnb_int8_t6", "bnb_int8_t0"]
        except Exception as exc:
            res["bnb_error"] = repr(exc)[:200]
    if args.kinds:
        wanted = args.kinds.split(",")
        unknown = sorted(set(wanted) - set(kinds))
        if unknown:
            print(f"unknown or unavailable kinds {unknown}; choose from {kinds}", file=sys.stderr)
            return 2
        kinds = [k for k in kinds if k in wanted]
    else:  # kernels not yet verified on a GPU run only when named: a crash there must not cost the other columns
        kinds = [k for k in kinds if k not in OPT_IN]
    res["hbm_copy_GBps"] = round(hbm_copy_gbps(), 1)
    print(f"HBM copy {res['hbm_copy_GBps']} GB/s on {res['gpu']}", flush=True)
    ms = [int(m) for m in args.ms.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        t0 = time.time()
        rows += bench_shape(k, n, ms, kinds)
        print(f"{shape} done in {time.time() - t0:.0f}s", flush=True)
        (Path(args.out) / "kernels_bench_partial.json").write_text(json.dumps(dict(res, rows=rows), indent=1))
    res["rows"] = rows
    if "bnb_int8_t6" in kinds:  # last, alone: a failed capture must not disturb the other measurements
        mods = [build("bnb_int8_t6", torch.randn(1024, 1024).half())]
        x = torch.randn(1, 1024, device=DEV).half()
        x[:, ::128] *= 20.0
        probe = time_kind(mods, x)
        res["graph_probe_bnb_int8_t6"] = probe.get("graph_error", f"captured: {probe.get('graph_us', 0):.1f} us")
    md = table(rows, res["hbm_copy_GBps"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_bench.json").write_text(json.dumps(res, indent=1))
    (out / "kernels_bench.md").write_text(md + "\n")
    print(f"results: {write_json(res, rows)}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
