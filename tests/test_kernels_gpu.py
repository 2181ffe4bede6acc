"""CUDA kernels against the pure-PyTorch reference (skipped without a GPU).

Fresh random inputs every run (seeded from the clock, printed on failure), outlier columns/weights present,
outputs poisoned with NaN through the caching allocator before each launch and checked to be fully written.
Tolerances: a small multiple of the error that the same computation in the same precision through torch makes
against an fp64 reference. The large shapes × M grid is sampled so every shape meets every M once and the
dtype / code / double-quant combinations rotate over it.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
import torch.nn.functional as F

import shardq.kernels.ops  # noqa: F401
from shardq.kernels import cuda_ops, lib, ops
from shardq.formats import blockwise, codebooks
from _f_numerics import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (4097, 1000), (1024, 1000), (2048, 4104)]
MS = [1, 2, 7, 16, 32, 256, 4096]
SEED = int(time.time() * 1000) % 2**31
DEV = "cuda"


def _gen(*key) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed((SEED + hash(key)) % 2**31)



def _poison(nbytes: int) -> None:
    """Leave a NaN-filled block of `nbytes` in the caching allocator, so the next output of that size gets it."""
    t = torch.full((max(nbytes, 2) // 2,), float("nan"), dtype=torch.float16, device=DEV)
    del t


@pytest.fixture(scope="module", autouse=True)
def _library():
    assert lib.load() is not None, f"kernels library unavailable: {lib.error()}"


def _quantized_weight(n: int, k: int, qt: str, dq: bool, g: torch.Generator, bs: int = 64):
    w = torch.randn(n, k, device=DEV, generator=g)
    w[:, ::97] *= 8.0  # outlier weights
    code = codebooks.code_4bit(qt, DEV)
    packed, absmax = ops.reference("quantize_4bit")(w, code, bs)
    if not dq:
        return packed, absmax, code, (None, None, 0.0), absmax
    nested = blockwise.quantize_absmax(absmax, codebooks.dynamic_map(DEV))
    real = blockwise.dequantize_absmax(nested.q, nested.nested_absmax, nested.code, float(nested.offset))
    return packed, nested.q, code, (nested.nested_absmax, nested.code, float(nested.offset)), real


def _grid():
    combos = list(itertools.product([torch.float16, torch.bfloat16], ["nf4", "fp4"], [False, True]))
    for i, ((k, n), m) in enumerate(itertools.product(SHAPES, MS)):
        yield pytest.param(k, n, m, *combos[i % len(combos)], id=f"K{k}-N{n}-M{m}-{i % len(combos)}")


def _check_gemm_4bit(k, n, m, dtype, qt, dq, key, bs=64):
    """Run shardq::gemm_4bit on fresh inputs, check it against the fp64 reference; returns the inputs and output."""
    g = _gen(key, k, n, m, bs)
    packed, absmax, code, nested, real = _quantized_weight(n, k, qt, dq, g, bs)
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    x[:, ::max(1, k // 8)] *= 20.0
    bias = torch.randn(n, device=DEV, generator=g).to(dtype) if m % 2 else None
    _poison(m * n * 2)
    out = torch.ops.shardq.gemm_4bit(x, packed, absmax, code, bs, n, k, *nested, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.isfinite(out).all(), "output not fully written"
    wdq = blockwise.dequantize_4bit_ref(packed, real, code, bs, [n, k], torch.float32)
    ref = x.double() @ wdq.double().T + (0 if bias is None else bias.double())
    same = F.linear(x, wdq.to(dtype), bias)
    tol = 4 * rel_err(same, ref) + 1e-5
    err = rel_err(out, ref)
    assert err <= tol, f"seed {SEED}: rel err {err:.3e} > {tol:.3e}"
    return (x, packed, absmax, code, nested, bias), out


@pytest.mark.parametrize("k,n,m,dtype,qt,dq", list(_grid()))
def test_gemm_4bit(k, n, m, dtype, qt, dq):
    _check_gemm_4bit(k, n, m, dtype, qt, dq, "g4")


@pytest.mark.parametrize("chunk_rows,k,n,m", [(1000, 4096, 4096, 256), (64, 1024, 1000, 33), (300, 4097, 1000, 40)])
def test_gemm_4bit_large_in_chunks(monkeypatch, chunk_rows, k, n, m):
    """Large M dequantizes W in row chunks, cuBLAS writing each chunk's output columns in place (ragged last)."""
    monkeypatch.setattr(cuda_ops, "DEQUANT_CHUNK_BYTES", chunk_rows * k * 2)
    monkeypatch.setattr(cuda_ops, "GEMM4_WGMMA", False)  # on Hopper it would take these shapes
    for dtype in (torch.float16, torch.bfloat16):
        _check_gemm_4bit(k, n, m, dtype, "nf4", m % 2 == 0, f"chunks{chunk_rows}")


# The default small-M kernels, called through the op and directly (which proves the op used them): "gemv"
# (csrc/gemm_4bit_gemv.cu: M <= 16, K % 128, K >= 1024, blocksize 64..1024 dividing K, x staged in shared memory)
# and "tc"
# (csrc/gemm_4bit_tc.cu: M <= 32, K % 128, blocksize >= 64; the op's choice with the GEMV off). Shapes: the issue
# shapes, a ragged N (1000 rows: not a multiple of any row tile), and shapes they must refuse (K = 4097; 4128 =
# 32 * 129; for tc M > 8 with fewer row tiles than SMs) so that the next kernel runs instead. test_gemm_4bit above
# runs the same op with whichever kernel takes the shape.
VAR_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (4097, 1000), (1024, 1000), (4128, 512),
              (11008, 1000)]
KERNELS = {"gemv": ("shardq_gemm_4bit_gemv", [1, 2, 3, 7, 8, 9, 12, 16]),
           "tc": ("shardq_gemm_4bit_tc", [1, 2, 7, 8, 9, 16, 17, 32])}


def _use(monkeypatch, kernel: str) -> None:
    monkeypatch.setattr(cuda_ops, "GEMM4_VARIANT", 4)
    monkeypatch.setattr(cuda_ops, "GEMM4_GEMV", kernel == "gemv")


def _direct(kernel, args, k, n, m, bs):
    """Call the kernel's launcher itself: (rc, output)."""
    x, packed, absmax, code, nested, bias = args
    am, _keep = cuda_ops._absmax_args(absmax, nested[0], nested[1], nested[2], -(-n * k // bs))
    _poison(m * n * 2)
    out = torch.empty((m, n), dtype=x.dtype, device=DEV)
    fn = getattr(lib.load(), KERNELS[kernel][0])
    rc = fn(x.data_ptr(), packed.data_ptr(), *am, code.data_ptr(), None if bias is None else bias.data_ptr(),
            out.data_ptr(), m, n, k, bs, cuda_ops.DTYPE_CODES[x.dtype], cuda_ops._stream(x))
    return rc, out


def _accepts(kernel: str, k: int, n: int, m: int, bs: int) -> bool:
    """The launcher's documented preconditions (fp16/bf16 and aligned pointers hold in these tests)."""
    props = torch.cuda.get_device_properties(0)
    if kernel == "gemv":
        smem = 65536 + (256 + 2 * 2048 * (1 if m <= 8 else 2)) * 4 + m * (2 * k + 32)
        fits = smem <= props.shared_memory_per_block_optin
        return m <= 16 and k % 128 == 0 and k >= 1024 and 64 <= bs <= 1024 and k % bs == 0 and fits
    if m > 32 or k % 128 or bs < 64:
        return False
    # tc leaves M > 8 with fewer row tiles (64 rows for M <= 16, else 128) than SMs to the K-split kernel
    return m <= 8 or -(-n // (64 if m <= 16 else 128)) >= props.multi_processor_count


def _kernel_grid():
    combos = list(itertools.product([torch.float16, torch.bfloat16], ["nf4", "fp4"], [False, True]))
    for kern, (_, ms) in KERNELS.items():
        for i, ((k, n), m) in enumerate(itertools.product(VAR_SHAPES, ms)):
            c = (i + i // 8) % len(combos)
            yield pytest.param(kern, k, n, m, *combos[c], id=f"{kern}-K{k}-N{n}-M{m}-{c}")


@pytest.mark.parametrize("kernel,k,n,m,dtype,qt,dq", list(_kernel_grid()))
def test_gemm_4bit_small_kernels(monkeypatch, kernel, k, n, m, dtype, qt, dq):
    _use(monkeypatch, kernel)
    args, out = _check_gemm_4bit(k, n, m, dtype, qt, dq, f"g4{kernel}")
    rc, direct = _direct(kernel, args, k, n, m, 64)
    if not _accepts(kernel, k, n, m, 64):
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{kernel} accepted K={k} N={n} M={m}"
    else:
        assert rc == 0, f"{kernel} refused K={k} N={n} M={m} (rc {rc})"
        assert torch.equal(direct, out), f"the op did not use {kernel}"


def _accepts_split(k: int, n: int, m: int, bs: int) -> bool:
    """shardq_gemm_4bit_gemv_split's preconditions: the GEMV's, with x staged for K / 2."""
    return k % 256 == 0 and _accepts("gemv", k // 2, n, m, bs) and k % bs == 0


@pytest.mark.parametrize("k,n,m,dtype,qt,dq", [
    (8192, 28672, 16, torch.float16, "nf4", False), (8192, 28672, 9, torch.bfloat16, "fp4", True),
    (11008, 4096, 16, torch.float16, "nf4", True), (11008, 4096, 12, torch.bfloat16, "nf4", False),
    (8192, 1000, 8, torch.float16, "fp4", False), (4096, 1000, 3, torch.bfloat16, "nf4", True),
    (2048, 1000, 16, torch.float16, "nf4", True), (1024, 1000, 4, torch.float16, "nf4", False),
    (4224, 96, 16, torch.bfloat16, "fp4", False), (16384, 256, 16, torch.bfloat16, "nf4", False)])
def test_gemm_4bit_gemv_split(monkeypatch, k, n, m, dtype, qt, dq):
    """The GEMV with K in two halves (x too large to stage whole, e.g. 16 tokens at K = 8192): called directly it
    matches the op's output (checked against the reference) to the output's rounding, and the op uses it, bit for
    bit, where the whole-K GEMV refuses; it refuses where K / 2 breaks the GEMV's preconditions or x still does not
    fit (K = 16384, M = 16)."""
    _use(monkeypatch, "gemv")
    args, out = _check_gemm_4bit(k, n, m, dtype, qt, dq, "g4split")
    x, packed, absmax, code, nested, bias = args
    am, _keep = cuda_ops._absmax_args(absmax, nested[0], nested[1], nested[2], -(-n * k // 64))
    ws = torch.full((m * n,), float("nan"), device=DEV)  # the launcher zeroes it
    _poison(m * n * 2)
    direct = torch.empty((m, n), dtype=dtype, device=DEV)
    rc = lib.load().shardq_gemm_4bit_gemv_split(x.data_ptr(), packed.data_ptr(), *am, code.data_ptr(),
                                                None if bias is None else bias.data_ptr(), direct.data_ptr(),
                                                ws.data_ptr(), m, n, k, 64, cuda_ops.DTYPE_CODES[dtype],
                                                cuda_ops._stream(x))
    if not _accepts_split(k, n, m, 64):
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"split accepted K={k} N={n} M={m}"
        return
    assert rc == 0, f"split refused K={k} N={n} M={m} (rc {rc})"
    assert torch.isfinite(direct).all()
    if _accepts("gemv", k, n, m, 64):
        assert rel_err(direct, out) <= 2 * torch.finfo(dtype).eps
    else:
        assert torch.equal(direct, out), "the op did not use the split GEMV"
        g = _gen("g4split-graph", k, n, m)
        fn = lambda xx: torch.ops.shardq.gemm_4bit(xx, packed, absmax, code, 64, n, k, *nested, bias)  # noqa: E731
        replayed, fresh = graph_replay(fn, x.clone(), g)
        assert torch.equal(replayed, fn(fresh)), "graph replay differs from eager"


def _tc_split(args, k, n, m, bs=64):
    """Call shardq_gemm_4bit_tc_split itself on NaN-filled scratch: (rc, output)."""
    x, packed, absmax, code, nested, bias = args
    am, _keep = cuda_ops._absmax_args(absmax, nested[0], nested[1], nested[2], -(-n * k // bs))
    ws = torch.full((cuda_ops.TC_SPLIT_PARTS * m * n,), float("nan"), device=DEV)  # every used part is written
    _poison(m * n * 2)
    out = torch.empty((m, n), dtype=x.dtype, device=DEV)
    rc = lib.load().shardq_gemm_4bit_tc_split(x.data_ptr(), packed.data_ptr(), *am, code.data_ptr(),
                                              None if bias is None else bias.data_ptr(), out.data_ptr(),
                                              ws.data_ptr(), m, n, k, bs, cuda_ops.DTYPE_CODES[x.dtype],
                                              cuda_ops._stream(x))
    return rc, out


@pytest.mark.parametrize("k,n,m,dtype,qt,dq", [
    (4096, 4096, 32, torch.float16, "nf4", False), (4096, 11008, 17, torch.bfloat16, "fp4", True),
    (11008, 4096, 24, torch.float16, "nf4", True), (4096, 1000, 32, torch.bfloat16, "nf4", False),
    (1024, 1000, 9, torch.float16, "fp4", False), (128, 8, 20, torch.bfloat16, "nf4", True),
    (384, 100, 32, torch.float16, "nf4", False), (8192, 28672, 32, torch.bfloat16, "nf4", False),
    (4224, 96, 12, torch.float16, "fp4", True), (4096, 16384, 30, torch.float16, "nf4", False)])
def test_gemm_4bit_tc_split(monkeypatch, k, n, m, dtype, qt, dq):
    """The ring kernel with K in parts (fewer row tiles than SMs at M > 8): called directly it matches the op's
    output (checked against the reference) to the output's rounding, gives the same bits on a second call (parts
    added in order, no atomics), and the op uses it, bit for bit, where the plain ring kernel refuses; graph replay
    equals eager there."""
    _use(monkeypatch, "tc")
    args, out = _check_gemm_4bit(k, n, m, dtype, qt, dq, "g4tcsplit")
    rc, direct = _tc_split(args, k, n, m)
    assert rc == 0, f"tc_split refused K={k} N={n} M={m} (rc {rc})"
    assert torch.isfinite(direct).all()
    assert torch.equal(direct, _tc_split(args, k, n, m)[1]), "two calls differ"
    if _accepts("tc", k, n, m, 64):
        assert rel_err(direct, out) <= 2 * torch.finfo(dtype).eps
        return
    assert torch.equal(direct, out), "the op did not use tc_split"
    x, packed, absmax, code, nested, bias = args
    fn = lambda xx: torch.ops.shardq.gemm_4bit(xx, packed, absmax, code, 64, n, k, *nested, bias)  # noqa: E731
    replayed, fresh = graph_replay(fn, x.clone(), _gen("g4tcsplit-graph", k, n, m))
    assert torch.equal(replayed, fn(fresh)), "graph replay differs from eager"


def test_gemm_4bit_tc_split_refusals():
    """Shapes outside the ring kernel's preconditions are refused with nothing launched, and so is a null ws."""
    for k, n, m in [(4097, 1000, 16), (4096, 1000, 33), (64, 100, 16)]:
        args, _ = _check_gemm_4bit(k, n, m, torch.float16, "nf4", False, "g4tcsplit-refuse")
        assert _tc_split(args, k, n, m)[0] == lib.CUDA_ERROR_NOT_SUPPORTED, f"accepted K={k} N={n} M={m}"
    x, packed, absmax, code, nested, bias = args
    rc = lib.load().shardq_gemm_4bit_tc_split(x.data_ptr(), packed.data_ptr(), absmax.data_ptr(), None, None, None,
                                              0.0, code.data_ptr(), None, x.data_ptr(), None, 16, 100, 4096, 64,
                                              0, cuda_ops._stream(x))
    assert rc == lib.CUDA_ERROR_NOT_SUPPORTED


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("bs,m", [(32, 3), (128, 5), (1024, 4), (2048, 1), (4096, 2), (256, 24), (512, 8)])
def test_gemm_4bit_small_kernel_blocksizes(monkeypatch, kernel, bs, m):
    """Blocksizes 32..K and beyond: each kernel takes the ones its mma blocks allow (bs >= 64; the GEMV also
    bs <= 1024) and the next kernel runs for the others."""
    _use(monkeypatch, kernel)
    k, n = 2048, 1000
    args, out = _check_gemm_4bit(k, n, m, torch.bfloat16 if m % 2 else torch.float16, "nf4", bs in (128, 512),
                                 f"g4{kernel}bs", bs)
    rc, direct = _direct(kernel, args, k, n, m, bs)
    assert rc == (0 if _accepts(kernel, k, n, m, bs) else lib.CUDA_ERROR_NOT_SUPPORTED)
    if rc == 0:
        assert torch.equal(direct, out)


def _any_layout_cases():
    shapes = [(1, 1), (3, 5), (7, 33), (9, 1000), (33, 17), (4097, 1000), (1001, 257), (4096, 64)]
    combos = itertools.product([torch.float16, torch.bfloat16, torch.float32], [64, 8, 12, 40], [False, True],
                               [False, True])
    for i, (((k, n), m), (dtype, bs, dq, shifted)) in enumerate(zip(itertools.product(shapes, [1, 3, 9, 32]),
                                                                   itertools.cycle(combos))):
        if dq and bs % 8:  # the nested absmax quantization keeps the blocksizes the loaders produce
            bs = 64
        yield pytest.param(k, n, m, dtype, bs, dq, shifted, id=f"K{k}-N{n}-M{m}-{i}")


@pytest.mark.parametrize("k,n,m,dtype,bs,dq,shifted", list(_any_layout_cases()))
def test_gemm_4bit_any_layout(k, n, m, dtype, bs, dq, shifted):
    """Layouts the small-M kernels refuse (fp32, K % 32 != 0, rows starting mid-byte, blocksizes not a multiple of
    8 or not a power of two, weights at an odd address) through the op, against the fp64 reference."""
    g = _gen("g4any", k, n, m, bs, dq, shifted)
    packed, absmax, code, nested, real = _quantized_weight(n, k, "nf4" if m % 2 else "fp4", dq, g, bs)
    if shifted:  # the same bytes one byte past a 16-byte boundary: no vector loads of them
        buf = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=DEV)
        buf[1:] = packed.reshape(-1)
        packed = buf[1:]
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    x[:, ::max(1, k // 8)] *= 20.0
    bias = torch.randn(n, device=DEV, generator=g).to(dtype) if n % 2 else None
    _poison(m * n * x.element_size())
    out = torch.ops.shardq.gemm_4bit(x, packed, absmax, code, bs, n, k, *nested, bias)
    assert torch.isfinite(out).all(), "output not fully written"
    wdq = blockwise.dequantize_4bit_ref(packed, real, code, bs, [n, k], torch.float32)
    ref = x.double() @ wdq.double().T + (0 if bias is None else bias.double())
    same = F.linear(x, wdq.to(dtype), bias)
    err, tol = rel_err(out, ref), 4 * rel_err(same, ref) + 1e-5
    assert err <= tol, f"seed {SEED}: rel err {err:.3e} > {tol:.3e}"


def _f32_cases():
    shapes = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (1056, 77), (2048, 4104), (4097, 1000),
              (8192, 1000), (32, 5), (65536, 5)]
    combos = itertools.cycle(itertools.product(["nf4", "fp4"], [False, True], [64, 32, 256, 4096]))
    for i, ((k, n), m) in enumerate(itertools.product(shapes, [1, 2, 3, 8, 9])):
        qt, dq, bs = next(combos)
        if dq and bs % 8:
            bs = 64
        yield pytest.param(k, n, m, qt, dq, bs, id=f"K{k}-N{n}-M{m}-{qt}-{'dq' if dq else 'plain'}-bs{bs}")


def _accepts_f32(k: int, m: int, bs: int) -> bool:
    """shardq_gemm_4bit_f32's preconditions (fp32 and aligned pointers hold in these tests)."""
    fits = k * 4 + 64 <= torch.cuda.get_device_properties(0).shared_memory_per_block_optin  # one token's x
    return m <= 8 and k % 32 == 0 and bs >= 32 and fits


@pytest.mark.parametrize("k,n,m,qt,dq,bs", list(_f32_cases()))
def test_gemm_4bit_f32(k, n, m, qt, dq, bs):
    """fp32 activations (bitsandbytes' default compute dtype): the op against the fp64 reference within a few times
    the error of the same fp32 computation through torch; the fp32 kernel called directly gives the op's output bit
    for bit where it takes the shape (so the op used it; tokens whose x does not fit in shared memory together go
    in several launches: M = 8 at K = 8192 and 11008), and refuses the rest (M > 8, K % 32, one token's x too
    large for shared memory at K = 65536), which the op then computes with the flat-array kernel (M <= 2, x fitting)
    or dequantize + cuBLAS."""
    g = _gen("g4f32", k, n, m, bs)
    packed, absmax, code, nested, real = _quantized_weight(n, k, qt, dq, g, bs)
    x = torch.randn(m, k, device=DEV, generator=g)
    x[:, ::max(1, k // 8)] *= 20.0
    bias = torch.randn(n, device=DEV, generator=g) if m % 2 else None
    _poison(m * n * 4)
    out = torch.ops.shardq.gemm_4bit(x, packed, absmax, code, bs, n, k, *nested, bias)
    assert out.dtype == torch.float32 and torch.isfinite(out).all(), "output not fully written"
    wdq = blockwise.dequantize_4bit_ref(packed, real, code, bs, [n, k], torch.float32)
    ref = x.double() @ wdq.double().T + (0 if bias is None else bias.double())
    err, tol = rel_err(out, ref), 4 * rel_err(F.linear(x, wdq, bias), ref) + 1e-7
    assert err <= tol, f"seed {SEED}: rel err {err:.3e} > {tol:.3e}"
    am, _keep = cuda_ops._absmax_args(absmax, nested[0], nested[1], nested[2], -(-n * k // bs))
    _poison(m * n * 4)
    direct = torch.empty((m, n), device=DEV)
    rc = lib.load().shardq_gemm_4bit_f32(x.data_ptr(), packed.data_ptr(), *am, code.data_ptr(),
                                         None if bias is None else bias.data_ptr(), direct.data_ptr(), m, n, k, bs,
                                         cuda_ops.DTYPE_CODES[x.dtype], cuda_ops._stream(x))
    if not _accepts_f32(k, m, bs):
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"f32 kernel accepted K={k} M={m} bs={bs}"
        return
    assert rc == 0, f"f32 kernel refused K={k} N={n} M={m} bs={bs} (rc {rc})"
    assert torch.equal(direct, out), "the op did not use the fp32 kernel"


def test_gemm_4bit_f32_refusals_and_graph():
    """The fp32 kernel refuses 16-bit x, blocksize 16 and unaligned weights; captured in a CUDA graph it replays
    like eager."""
    g = _gen("g4f32-graph")
    n, k = 1000, 2048
    packed, absmax, code, nested, _ = _quantized_weight(n, k, "nf4", True, g)
    am, _keep = cuda_ops._absmax_args(absmax, nested[0], nested[1], nested[2], -(-n * k // 64))
    out = torch.empty((1, n), device=DEV)
    f32 = lib.load().shardq_gemm_4bit_f32
    for dtype, bs, w in [(torch.float16, 64, packed), (torch.float32, 16, packed),
                         (torch.float32, 64, torch.cat([packed.new_zeros(1), packed.reshape(-1)])[1:])]:
        x = torch.randn(1, k, device=DEV, dtype=dtype, generator=g)
        rc = f32(x.data_ptr(), w.data_ptr(), *am, code.data_ptr(), None, out.data_ptr(), 1, n, k, bs,
                 cuda_ops.DTYPE_CODES[dtype], cuda_ops._stream(x))
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, (dtype, bs, w.data_ptr() % 16)
    fn = lambda xx: torch.ops.shardq.gemm_4bit(xx, packed, absmax, code, 64, n, k, *nested, None)  # noqa: E731
    for m in (1, 5):
        replayed, fresh = graph_replay(fn, torch.randn(m, k, device=DEV, generator=g), g)
        assert torch.equal(replayed, fn(fresh)), f"M={m}: graph replay differs from eager"


@pytest.mark.parametrize("k,n,m", [(4096, 4096, 1), (4096, 11008, 7), (4097, 1000, 16), (8192, 28672, 32),
                                   (11008, 4096, 2), (1024, 1000, 256), (4096, 4104, 4096), (8192, 28672, 4096),
                                   (4097, 1003, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_linear(k, n, m, dtype, threshold):
    g = _gen("i8", k, n, m, threshold)
    w8, scb = ops.reference("quantize_int8_rowwise")(torch.randn(n, k, device=DEV, generator=g))
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    x[:, ::max(1, k // 8)] *= 20.0
    bias = torch.randn(n, device=DEV, generator=g).to(dtype)
    _poison(m * n * 2)
    out = torch.ops.shardq.int8_linear(x, w8, scb, bias, threshold)
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.isfinite(out).all(), "output not fully written"
    ref = ops.reference("int8_linear")(x, w8, scb, bias, threshold)
    exact = ref.float()  # the reference in fp32 before its final rounding to x.dtype would differ by ~eps
    eps = torch.finfo(dtype).eps
    err = rel_err(out, exact)
    assert err <= 2 * eps, f"seed {SEED}: rel err {err:.3e} vs reference (eps {eps:.1e})"
    return (x, w8, scb, bias), out


@pytest.mark.parametrize("k,n,m,every,dtype", [(1024, 1000, 64, 8, torch.float16), (4096, 4104, 300, 3, torch.bfloat16),
                                               (1000, 1003, 33, 16, torch.float16), (1024, 512, 40, 8, torch.float32),
                                               (4104, 96, 65, 50, torch.float32), (1024, 1000, 16, 8, torch.float16),
                                               (2048, 1032, 7, 30, torch.bfloat16), (4096, 4096, 32, 2, torch.float16),
                                               (1000, 1003, 12, 9, torch.float16)])
def test_int8_linear_many_outliers(k, n, m, every, dtype):
    """More outlier columns than the kernels stage: large M (torch._int_mm + epilogue) past INT8_OUTLIER_CAP, small
    M (the tensor-core kernel) past its 32 staged columns; the rest are read from x and W directly. Ragged N and K
    take the scalar kernels."""
    g = _gen("i8many", k, n, m)
    w8, scb = ops.reference("quantize_int8_rowwise")(torch.randn(n, k, device=DEV, generator=g))
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    x[:, ::every] *= 20.0
    bias = torch.randn(n, device=DEV, generator=g).to(dtype) if m % 2 else None
    _poison(m * n * 4)
    out = torch.ops.shardq.int8_linear(x, w8, scb, bias, 6.0)
    assert torch.isfinite(out).all(), "output not fully written"
    ref = ops.reference("int8_linear")(x, w8, scb, bias, 6.0).float()
    eps = max(torch.finfo(dtype).eps, 1e-6)
    err = rel_err(out, ref)
    assert err <= 2 * eps, f"seed {SEED}: rel err {err:.3e} vs reference ({-(-k // every)} outlier columns)"


@pytest.mark.parametrize("k,n,m", [(4096, 4096, 1), (4096, 11008, 2), (11008, 4096, 3), (8192, 28672, 4),
                                   (1024, 1000, 1), (4112, 1003, 4), (4097, 1000, 1), (1000, 1003, 1), (4104, 96, 1),
                                   (16383, 130, 1), (33, 77, 1), (7, 5, 1), (4097, 1000, 2),
                                   (2049, 5000, 1), (4097, 1000, 4), (1000, 1003, 3), (16383, 130, 2),
                                   (33, 77, 4), (40001, 64, 2), (40001, 64, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_int8_fused_small_m(k, n, m, dtype, threshold):
    """The one-launch kernel (activation prep inside every CTA) computes M <= 4 within the reference's tolerance;
    the op takes it for M <= INT8_FUSED_MAX_M, and for K % 32 != 0 up to INT8_ANY_MAX_M (its output is then the
    direct call's). K % 32 != 0 (rows of W not 16-byte aligned) is taken for M = 1 up to K = 16384 and for
    2 <= M <= 4 where the staged q rows fit (the unaligned-row kernels), refused otherwise (the prepare path runs)."""
    (x, w8, scb, bias), out = test_int8_linear(k, n, m, dtype, threshold)
    _poison(m * n * 2)
    direct = torch.empty_like(out)
    rc = lib.load().shardq_int8_gemv_fused(x.data_ptr(), w8.data_ptr(), scb.data_ptr(), bias.data_ptr(),
                                           direct.data_ptr(), m, n, k, threshold, cuda_ops.DTYPE_CODES[dtype],
                                           cuda_ops._stream(x))
    rows = 2 if m <= 2 else 4
    staged = rows * ((16 + k + 32 + 15) // 16 * 16) + (k + 31) // 32 * 4
    if k % 32 and not (m == 1 and k <= 16384 or m >= 2 and staged <= 96 * 1024):
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED
        return
    assert rc == 0
    ref = ops.reference("int8_linear")(x, w8, scb, bias, threshold).float()
    err = rel_err(direct, ref)
    assert err <= 2 * torch.finfo(dtype).eps, f"seed {SEED}: fused kernel rel err {err:.3e}"
    if m <= cuda_ops.INT8_FUSED_MAX_M or k % 32 and m <= cuda_ops.INT8_ANY_MAX_M:
        assert torch.equal(direct, out), "the op did not use the fused kernel"


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,bs", [((4096, 4096), 64), ((1000, 4097), 64), ((33, 77), 128), ((512, 96), 32),
                                      ((7, 1001), 4096)])
def test_quantize_dequantize_4bit(qt, dtype, shape, bs):
    g = _gen("q4", shape, bs)
    a = (torch.randn(shape, device=DEV, generator=g) * 3).to(dtype)
    a.view(-1)[:: 211] *= 25.0
    code = codebooks.code_4bit(qt, DEV)
    packed, absmax = torch.ops.shardq.quantize_4bit(a, code, bs)
    rp, ra = ops.reference("quantize_4bit")(a, code, bs)
    assert torch.equal(absmax, ra)
    assert torch.equal(packed, rp)  # same scaling, same rounding rule (FP4 thresholds, NF4 midpoints)
    n = a.numel()
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        _poison(n * torch.finfo(out_dtype).bits // 8)
        deq = torch.ops.shardq.dequantize_4bit(rp, ra, code, bs, list(shape), out_dtype)
        assert torch.equal(deq, blockwise.dequantize_4bit_ref(rp, ra, code, bs, list(shape), out_dtype))


@pytest.mark.parametrize("e0,count,bs", [(0, 4097 * 1000, 64), (8, 9, 64), (24, 1001, 8), (4104, 8 * 517 + 7, 128),
                                         (3, 1000, 64), (16, 7, 64), (0, 777, 12), (64, 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_4bit_ranges(e0, count, bs, dtype):
    """The launcher on element ranges [e0, e0 + count) as gemm_4bit's large-M chunks use it: whole words through the
    vector kernel, tails and unaligned starts through the per-element one; every element written, exactly."""
    g = _gen("dq4r", e0, count, bs)
    total = e0 + count + 5
    a = torch.randn(total, device=DEV, generator=g) * 3
    code = codebooks.code_4bit("nf4", DEV)
    packed, absmax = ops.reference("quantize_4bit")(a, code, bs)
    out = torch.full((count,), float("nan"), dtype=dtype, device=DEV)
    am, _keep = cuda_ops._absmax_args(absmax, None, None, 0.0, absmax.numel())
    rc = lib.load().shardq_dequantize_4bit(packed.data_ptr(), *am, code.data_ptr(), out.data_ptr(), e0, count, bs,
                                           cuda_ops.DTYPE_CODES[dtype], cuda_ops._stream(out))
    assert rc == 0
    torch.cuda.synchronize()
    want = blockwise.dequantize_4bit_ref(packed, absmax, code, bs, [total], dtype)[e0:e0 + count]
    assert torch.equal(out, want)


@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 4097), (3, 5, 77), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_int8_rowwise(shape, dtype):
    a = torch.randn(shape, device=DEV, generator=_gen("r8", shape)).to(dtype)
    a.view(-1)[::31] *= 30.0
    q, s = torch.ops.shardq.quantize_int8_rowwise(a)
    rq, rs = ops.reference("quantize_int8_rowwise")(a)
    assert torch.equal(s, rs) and torch.equal(q, rq)


def graph_replay(fn, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Capture `fn(x)` in a CUDA graph (after a warm-up call outside it: build, cuBLAS handles), copy fresh inputs
    with outlier columns into `x`, replay; returns (replayed output, the fresh inputs)."""
    fn(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    fresh = torch.randn(x.shape, device=DEV, dtype=x.dtype, generator=g)
    fresh[:, ::256] *= 20.0
    x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    return out, fresh


@pytest.mark.parametrize("variant,gemv", [(1, False), (4, False), (4, True)])
def test_cuda_graph_capture(monkeypatch, variant, gemv):
    monkeypatch.setattr(cuda_ops, "GEMM4_VARIANT", variant)
    monkeypatch.setattr(cuda_ops, "GEMM4_GEMV", gemv)
    g = _gen("graph", variant, gemv)
    n, k = 1024, 2048
    packed, absmax, code, nested, _ = _quantized_weight(n, k, "nf4", True, g)
    w8, scb = ops.reference("quantize_int8_rowwise")(torch.randn(n, k, device=DEV, generator=g))
    xs = {m: torch.randn(m, k, device=DEV, dtype=torch.float16, generator=g) for m in (1, 8, 13, 64)}
    fns = {
        "gemm_4bit": lambda x: torch.ops.shardq.gemm_4bit(x, packed, absmax, code, 64, n, k, *nested, None),
        "int8_linear": lambda x: torch.ops.shardq.int8_linear(x, w8, scb, None, 6.0),
    }
    for (name, fn), (m, x) in itertools.product(fns.items(), xs.items()):
        out, fresh = graph_replay(fn, x, g)
        assert torch.equal(out, fn(fresh)), f"{name} M={m}: graph replay differs from eager"


def test_opcheck():
    g = _gen("opcheck")
    n, k = 96, 256
    code = codebooks.code_4bit("nf4", DEV)
    w = torch.randn(n, k, device=DEV, generator=g)
    packed, absmax = torch.ops.shardq.quantize_4bit(w, code, 64)
    x = torch.randn(3, 5, k, device=DEV, dtype=torch.float16, generator=g)
    w8, scb = torch.ops.shardq.quantize_int8_rowwise(w)
    cases = [
        (torch.ops.shardq.quantize_4bit.default, (w, code, 64)),
        (torch.ops.shardq.dequantize_4bit.default, (packed, absmax, code, 64, [n, k], torch.bfloat16)),
        (torch.ops.shardq.gemm_4bit.default, (x, packed, absmax, code, 64, n, k, None, None, 0.0, None)),
        (torch.ops.shardq.quantize_int8_rowwise.default, (w,)),
        (torch.ops.shardq.int8_linear.default, (x, w8, scb, None, 6.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_non_contiguous_inputs():
    """Strided absmax / x views are made contiguous and kept alive through the launch."""
    g = _gen("strided")
    n, k = 512, 1024
    packed, absmax, code, _, _ = _quantized_weight(n, k, "nf4", False, g)
    strided_absmax = torch.stack([absmax, torch.full_like(absmax, float("nan"))], 1)[:, 0]
    x = torch.randn(k, 5, device=DEV, dtype=torch.float16, generator=g).t()
    for m in (5, 64):
        xm = x if m == 5 else torch.randn(k, m, device=DEV, dtype=torch.float16, generator=g).t()
        out = torch.ops.shardq.gemm_4bit(xm, packed, strided_absmax, code, 64, n, k, None, None, 0.0, None)
        ref = ops.reference("gemm_4bit")(xm.contiguous(), packed, absmax, code, 64, n, k, None, None, 0.0, None)
        assert torch.isfinite(out).all() and rel_err(out, ref) < 5e-3


def test_bad_input_is_rejected_before_launch():
    code = codebooks.code_4bit("nf4", DEV)
    packed = torch.zeros(100, 1, dtype=torch.uint8, device=DEV)
    x = torch.randn(1, 20, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="absmax"):
        cuda_ops.gemm_4bit(x, packed, torch.zeros(3, device=DEV), code, 64, 10, 20, None, None, 0.0, None)
    with pytest.raises(ValueError, match="on cpu"):
        cuda_ops.gemm_4bit(x, packed, torch.zeros(4), code, 64, 10, 20, None, None, 0.0, None)
    with pytest.raises(ValueError, match="int8"):
        cuda_ops.int8_linear(x, torch.zeros(10, 20, device=DEV), torch.ones(10, device=DEV), None, 6.0)
