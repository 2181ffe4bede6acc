"""`python -m shardq.kernels --check`: build, load and check every CUDA op against the reference.

Prints a status table: the build (path, time or the compiler's message) and, per op, which path ran and the
relative error against the pure-PyTorch reference on fresh random inputs with outliers. Exit status 0 only if
the library loaded and every op matched. Without a GPU it says so at once and exits 1 (nothing was checked):
`--build` compiles the library into the cache without one (CI's kernel step, or to carry it to a GPU machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class CheckRow:
    op: str
    case: str
    rel_err: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tol


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cases(dev: torch.device) -> list[CheckRow]:
    from shardq.formats import blockwise, codebooks
    from shardq.kernels.ops import reference

    rows = []
    g = torch.Generator(device=dev).manual_seed(int(time.time()))
    for qt in ("nf4", "fp4"):
        code = codebooks.code_4bit(qt, dev)
        w = torch.randn(384, 1024, device=dev, generator=g)
        w[:, 7] *= 30.0
        packed, absmax = torch.ops.shardq.quantize_4bit(w, code, 64)
        rp, ra = reference("quantize_4bit")(w, code, 64)
        rows.append(CheckRow("quantize_4bit", qt, float((packed != rp).float().mean()), 1e-4))
        deq = torch.ops.shardq.dequantize_4bit(packed, absmax, code, 64, [384, 1024], torch.float16)
        rdeq = blockwise.dequantize_4bit_ref(rp, ra, code, 64, [384, 1024], torch.float16)
        rows.append(CheckRow("dequantize_4bit", qt, _rel(deq, rdeq), 1e-3))
        for m in (1, 7, 64):
            x = torch.randn(m, 1024, device=dev, dtype=torch.float16, generator=g)
            out = torch.ops.shardq.gemm_4bit(x, packed, absmax, code, 64, 384, 1024, None, None, 0.0, None)
            ref = reference("gemm_4bit")(x, packed, absmax, code, 64, 384, 1024, None, None, 0.0, None)
            rows.append(CheckRow("gemm_4bit", f"{qt} M={m}", _rel(out, ref), 5e-3))
        w = torch.randn(96, 1001, device=dev, generator=g)  # odd K: rows start mid-byte (the flat-array kernel)
        packed, absmax = torch.ops.shardq.quantize_4bit(w, code, 64)
        for m in (1, 5):
            x = torch.randn(m, 1001, device=dev, dtype=torch.float16, generator=g)
            out = torch.ops.shardq.gemm_4bit(x, packed, absmax, code, 64, 96, 1001, None, None, 0.0, None)
            ref = reference("gemm_4bit")(x, packed, absmax, code, 64, 96, 1001, None, None, 0.0, None)
            rows.append(CheckRow("gemm_4bit", f"{qt} K=1001 M={m}", _rel(out, ref), 5e-3))
    rows += _grouped_cases(dev, g)
    a = torch.randn(300, 1000, device=dev, dtype=torch.float16, generator=g)
    q, s = torch.ops.shardq.quantize_int8_rowwise(a)
    rq, rs = reference("quantize_int8_rowwise")(a)
    rows.append(CheckRow("quantize_int8_rowwise", "300x1000", float((q.int() - rq.int()).abs().max()), 1.0))
    w8, scb = reference("quantize_int8_rowwise")(torch.randn(512, 1024, device=dev, generator=g))
    for m in (1, 7, 64):
        x = torch.randn(m, 1024, device=dev, dtype=torch.float16, generator=g)
        x[:, ::128] *= 20.0
        out = torch.ops.shardq.int8_linear(x, w8, scb, None, 6.0)
        ref = reference("int8_linear")(x, w8, scb, None, 6.0)
        rows.append(CheckRow("int8_linear", f"M={m} thr=6", _rel(out, ref), 5e-3))
    w8, scb = reference("quantize_int8_rowwise")(torch.randn(96, 1001, device=dev, generator=g))
    x = torch.randn(1, 1001, device=dev, dtype=torch.float16, generator=g)  # odd K: rows of W not 16-byte aligned
    x[:, ::128] *= 20.0
    out = torch.ops.shardq.int8_linear(x, w8, scb, None, 6.0)
    ref = reference("int8_linear")(x, w8, scb, None, 6.0)
    rows.append(CheckRow("int8_linear", "K=1001 M=1 thr=6", _rel(out, ref), 5e-3))
    return rows


def _grouped_cases(dev: torch.device, g: torch.Generator) -> list[CheckRow]:
    """grouped_gemm_4bit: 4 experts of 384x1024 nf4, expert 2 without rows, 1 and 16 tokens per expert."""
    from shardq.formats import codebooks
    from shardq.kernels.ops import reference

    code = codebooks.code_4bit("nf4", dev)
    parts = [
        torch.ops.shardq.quantize_4bit(torch.randn(384, 1024, device=dev, generator=g), code, 64) for _ in range(4)
    ]
    packed = torch.stack([p.reshape(-1) for p, _ in parts])
    absmax, codes = torch.stack([a for _, a in parts]), code.expand(4, 16).contiguous()
    rows = []
    for per in (1, 16):
        offsets = torch.tensor([0, per, 2 * per, 2 * per, 3 * per], device=dev)
        x = torch.randn(3 * per, 1024, device=dev, dtype=torch.float16, generator=g)
        args = (x, offsets, packed, absmax, codes, 64, 384, None, None, None)
        out = torch.ops.shardq.grouped_gemm_4bit(*args)
        rows.append(
            CheckRow("grouped_gemm_4bit", f"nf4 E=4 rows={per}", _rel(out, reference("grouped_gemm_4bit")(*args)), 5e-3)
        )
    return rows


NO_GPU = (
    "no CUDA GPU visible: nothing to check (on this machine the ops run the PyTorch reference). "
    "`python -m shardq.kernels --build` compiles the kernels without a GPU."
)


def build_only() -> int:
    """Compile csrc/ into the cache (no GPU needed); 0 with the library's path, 1 with the compiler's message."""
    from shardq.kernels import build

    t0 = time.time()
    try:
        path = build.built_library()
    except build.BuildError as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"{'library':<24}{path}  ({time.time() - t0:.1f}s; cache {build.cache_root()})")
    return 0


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardq.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="build, load and check every op on the GPU (default)")
    parser.add_argument("--build", action="store_true", help="only compile the library into the cache (no GPU needed)")
    args = parser.parse_args(argv)
    if args.build:
        return build_only()
    if not torch.cuda.is_available():  # before the build: without a GPU there is nothing to check
        print(NO_GPU)
        return 1
    import shardq.kernels.ops  # noqa: F401  (defines the ops and registers the CUDA kernels)
    from shardq.kernels import build, lib

    t0 = time.time()
    loaded = lib.load() is not None
    print(f"{'library':<24}{'loaded' if loaded else 'UNAVAILABLE'}  ({time.time() - t0:.1f}s)  {lib.path() or ''}")
    if not loaded:
        print(f"{'reason':<24}{lib.error()}")
    print(f"{'sources':<24}{build.csrc_dir()}")
    dev = torch.device("cuda", torch.cuda.current_device())
    print(f"{'device':<24}{torch.cuda.get_device_name(dev)}")
    rows = _cases(dev)
    print(f"\n{'op':<24}{'case':<18}{'rel err':>10}{'tol':>10}  status")
    for r in rows:
        print(f"{r.op:<24}{r.case:<18}{r.rel_err:>10.2e}{r.tol:>10.0e}  {'ok' if r.ok else 'FAIL'}")
    return 0 if loaded and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(run())
