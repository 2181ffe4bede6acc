"""Run one quantized layer a few times, for a profiler (ncu) to read the kernels' hardware counters.

    ncu --clock-control none -k regex:gemm4 python bench/profile_kernel.py --kind sq_nf4 --shape 8192x28672 --m 1

The weights are built as in bench_kernels.py (same contenders); `--variant` picks the small-M 4-bit kernel,
`--wgmma` forces the Hopper fused-dequant one for any M > 32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import DEV, build  # noqa: E402

from shardq.kernels import cuda_ops  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="sq_nf4")
    ap.add_argument("--shape", default="8192x28672", help="KxN")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--variant", type=int, default=cuda_ops.GEMM4_VARIANT)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--wgmma", action="store_true",
                    help="force the Hopper fused-dequant GEMM (csrc/gemm_4bit_wgmma.cu) for any M > 32 and grid")
    args = ap.parse_args(argv)
    k, n = (int(v) for v in args.shape.split("x"))
    cuda_ops.GEMM4_VARIANT = args.variant
    if args.wgmma:
        cuda_ops.WGMMA_MAX_M, cuda_ops.WGMMA_MIN_FILL = 1 << 30, 0.0
    mod = build(args.kind, (torch.randn(n, k) * 0.02).half())
    x = torch.randn(args.m, k, device=DEV).half()
    x[:, :: max(1, k // 8)] *= 20.0
    with torch.inference_mode():
        for _ in range(args.calls):
            mod(x)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
