"""Where the time of the large-M quantized paths goes, piece by piece, on one GPU (graph-captured µs).

    python bench/bench_pieces.py --shapes 4096x4096,8192x28672 --ms 512,4096 --out $OUT

int8 (threshold 6 with outlier columns, and 0): each launch of the op alone — the activation prepare step,
cuBLASLt's int8 GEMM (torch._int_mm), the dequantizing epilogue — and the whole op, against fp16 cuBLAS.
nf4 (M > 32: dequantize + cuBLAS): the whole op, the dequantize pass alone, and the fp16 GEMM it feeds.
prep: the int8 prepare step alone, 20 back-to-back calls per graph (N is ignored), for small batches too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import DEV, build, events_ms, hbm_copy_gbps  # noqa: E402

from shardq.kernels import cuda_ops  # noqa: E402
from shardq.kernels import lib as _lib  # noqa: E402



def graph_us(fn, calls: int = 10) -> float:
    """Replay time of a CUDA graph of `calls` back-to-back fn() calls, per call."""
    with torch.inference_mode():
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        g.replay()
        return events_ms(g.replay, 5) * 1e3 / calls


def x_with_outliers(m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k, device=DEV).half()
    x[:, :: max(1, k // 8)] *= 20.0
    return x


def prepare_call(x: torch.Tensor, p: dict, xo, cap: int, thr: float):
    """int8_linear's prepare step on x into the scratch pointers p, as a no-argument call (the stream is read at each
    call: graph capture runs on a side stream)."""
    lib = _lib.load()
    m, k = x.shape

    def prepare():
        rc = lib.shardq_int8_prepare(x.data_ptr(), p["q"], p["row_absmax"], p["colmax"], p["list"], p["count"], xo,
                                     cap, m, k, float(thr), 0, cuda_ops._stream(x))
        _lib.check(rc, "int8_prepare")

    return prepare


def int8_pieces(k: int, n: int, m: int, thr: float) -> dict:
    """The op, and each of its launches alone on the same prepared scratch."""
    lib = _lib.load()
    mod = build("sq_int8_t6" if thr else "sq_int8_t0", (torch.randn(n, k) * 0.02).half())
    x = x_with_outliers(m, k)
    w, scb = mod.weight, mod.SCB
    out = torch.empty((m, n), dtype=x.dtype, device=DEV)
    cap = min(k, cuda_ops.INT8_OUTLIER_CAP) if thr else 0
    buf, off = cuda_ops._int8_scratch(m, k, DEV, m * cap * 2)
    p = {name: buf.data_ptr() + o for name, o in off.items()}
    xo = p["xo"] if cap else None
    q = buf[off["q"]:off["q"] + m * k].view(torch.int8).view(m, k)

    prepare = prepare_call(x, p, xo, cap, thr)
    prepare()
    acc = torch._int_mm(q, w.t())

    def epilogue():
        rc = lib.shardq_int8_epilogue(acc.data_ptr(), acc.stride(0), p["row_absmax"], xo, cap, x.data_ptr(),
                                      w.data_ptr(), scb.data_ptr(), p["list"], p["count"], None, out.data_ptr(), m,
                                      n, k, 0, cuda_ops._stream(x))
        _lib.check(rc, "int8_epilogue")

    fp16 = build("fp16", (torch.randn(n, k) * 0.02).half())
    count = int(buf[off["count"]:off["count"] + 4].view(torch.int32).item())
    res = {"fp16": graph_us(lambda: fp16(x)), "prepare": graph_us(prepare),
           "int_mm": graph_us(lambda: torch._int_mm(q, w.t())), "epilogue": graph_us(epilogue), "outliers": count}
    res["op"] = graph_us(lambda: mod(x))
    return res


def prep_piece(k: int, m: int, thr: float) -> dict:
    """int8_linear's activation prepare step alone (any M: small batches take the two-launch path)."""
    x = x_with_outliers(m, k)
    buf, off = cuda_ops._int8_scratch(m, k, DEV)
    p = {name: buf.data_ptr() + o for name, o in off.items()}
    return {"prepare": graph_us(prepare_call(x, p, None, 0, thr), calls=20)}


def nf4_pieces(k: int, n: int, m: int) -> dict:
    """The large-M 4-bit op (dequantize into scratch + cuBLAS) against its two parts alone: the dequantize pass over
    the whole weight and the fp16 GEMM (cuBLAS on an fp16 weight)."""
    mod = build("sq_nf4", (torch.randn(n, k) * 0.02).half())
    fp16 = build("fp16", (torch.randn(n, k) * 0.02).half())
    x = x_with_outliers(m, k)

    def dequantize():
        torch.ops.shardq.dequantize_4bit(mod.weight, mod.absmax, mod.quant_map, mod.blocksize, [n, k], torch.float16)

    return {"fp16": graph_us(lambda: fp16(x)), "dequantize": graph_us(dequantize), "op": graph_us(lambda: mod(x))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x28672")
    ap.add_argument("--ms", default="512,4096")
    ap.add_argument("--parts", default="int8,nf4", help="int8, nf4, prep (the int8 prepare step alone, any M)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    hbm = hbm_copy_gbps()
    print(f"HBM copy {hbm:.0f} GB/s; {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.ms.split(",")):
            if "int8" in args.parts:
                for thr in (6.0, 0.0):
                    r = {"K": k, "N": n, "M": m, "what": f"int8 t{thr:g}", **int8_pieces(k, n, m, thr)}
                    rows.append(r)
                    print(json.dumps({a: round(b, 1) if isinstance(b, float) else b for a, b in r.items()}),
                          flush=True)
            if "prep" in args.parts:
                for thr in (6.0, 0.0):
                    r = {"K": k, "M": m, "what": f"int8 prepare t{thr:g}", **prep_piece(k, m, thr)}
                    rows.append(r)
                    print(json.dumps({a: round(b, 2) if isinstance(b, float) else b for a, b in r.items()}),
                          flush=True)
            if "nf4" in args.parts:
                r = {"K": k, "N": n, "M": m, "what": "nf4", **nf4_pieces(k, n, m)}
                rows.append(r)
                print(json.dumps({a: round(b, 1) if isinstance(b, float) else b for a, b in r.items()}), flush=True)
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out, "pieces.json").write_text(json.dumps({"hbm_gbps": hbm, "rows": rows}, indent=1))
    print("results:", write_json(rows, hbm))
    return 0


def write_json(rows: list[dict], hbm: float) -> Path:
    """bench/results/pieces.json: one row per (shape, M, path), the µs of each launch of that path."""
    from results_io import write_result

    pieces = list(dict.fromkeys(k for r in rows for k in r if k not in ("K", "N", "M", "what")))
    out = [[r["what"], f"{r['K']}×{r.get('N', '-')}", r["M"], *(round(r[p], 1) if isinstance(r.get(p), float)
                                                                 else r.get(p) for p in pieces)] for r in rows]
    notes = [f"The large-M paths launch by launch (graph µs); HBM copy bandwidth in the same run: {hbm:.0f} GB/s.",
             "History and analysis: bench/history/kernels.md."]
    return write_result("pieces", "Large-M quantized matmuls split into their launches", ["path", "K×N", "M", *pieces],
                        out, notes)


if __name__ == "__main__":
    sys.exit(main())
