"""Host cost of calling a kernel through the torch.library dispatcher, as shardq's ops are, versus calling the
same Python function directly (what `shardq.kernels.ops.call` does for eager CUDA inputs). Runs on any machine: the op is
a no-op with gemm_4bit's argument list, so only Python/dispatcher time is measured.

    python bench/bench_op_overhead.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch
from torch import Tensor


def noop_gemm(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
              in_features: int, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], nested_offset: float,
              bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


torch.library.custom_op("shardq_bench::noop_gemm", mutates_args=())(noop_gemm)


def per_call_us(fn, args: tuple, calls: int) -> float:
    for _ in range(min(1000, calls)):
        fn(*args)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    calls = ap.parse_args(argv).calls
    args = (torch.randn(1, 64), torch.empty(2048, 1, dtype=torch.uint8), torch.empty(64), torch.empty(16), 64, 64, 64,
            None, None, 0.0, None)
    rows = []
    for mode in ("grad enabled", "inference_mode"):
        with torch.inference_mode(mode == "inference_mode"):
            op = per_call_us(torch.ops.shardq_bench.noop_gemm, args, calls)
            fn = per_call_us(noop_gemm, args, calls)
        rows.append([mode, round(op, 1), round(fn, 1), round(op - fn, 1)])
    from results_io import write_result

    worst = max(r[3] for r in rows)
    notes = [f"The op dispatcher costs up to {worst} µs of host time per call here ({torch.__version__}), so eager "
             "CUDA calls go to the kernel directly (shardq.kernels.ops.call)", f"{calls} calls each."]
    path = write_result("op_overhead", "Host cost of the torch.library dispatcher per op call (no-op, gemm_4bit's "
                        "argument list)", ["mode", "through the op µs", "direct call µs", "dispatcher µs"], rows, notes,
                        gpu="cpu" if not torch.cuda.is_available() else None)
    print(f"results: {path}\ntorch {torch.__version__}, {calls} calls each")
    print("| mode | through the op µs | direct µs | dispatcher µs |\n|---|---:|---:|---:|")
    print("\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
