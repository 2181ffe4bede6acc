"""CUDA implementations of the `shardq::*` ops: argument checks, torch-allocated outputs, one library call.

Each wrapper checks devices/dtypes/shapes (clear errors before any launch), allocates outputs and scratch with
torch (so CUDA-graph capture and the caching allocator see every byte), passes raw pointers and the current
stream to the library, and never synchronizes. If the library is unavailable it calls the reference.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from shardq.kernels import lib as _lib
from shardq.kernels import reference as _ref

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
SMALL_M = 32  # gemm_4bit / int8_linear use the GEMV-style kernels up to this many rows
# Scratch cap for the large-M 4-bit path (weight rows dequantized per cuBLAS call), in bytes.
DEQUANT_CHUNK_BYTES = int(float(os.environ.get("SHARDQ_DEQUANT_CHUNK_MB", "512")) * 2**20)
# Small-M 4-bit kernel: 4 (default) = csrc/gemm_4bit_tc.cu (cp.async ring, swapped-operand tensor-core mma,
# persistent CTAs), falling back to 1 where it refuses a shape; 1 = csrc/gemm_4bit_small.cu only (K-split CTAs;
# kept selectable for comparisons). Variants 2, 3 and 5 were measured slower and removed (bench/RESULTS.md).
GEMM4_VARIANT = int(os.environ.get("SHARDQ_GEMM4_VARIANT", "4"))
# Decode-sized 4-bit GEMM (variant 4, M <= GEMV_MAX_M): csrc/gemm_4bit_gemv.cu first (weights straight from global
# memory into registers, no ring; H200, 8192x28672, M = 1: 52.5 vs 65 us; 9 <= M <= 16 as a second token fragment),
# K split in two halves where x is too large to stage whole (fp32 scratch, a memset and a second launch), the ring
# kernel where both refuse a shape.
# SHARDQ_GEMM4_GEMV=0 keeps the ring kernel.
GEMM4_GEMV = os.environ.get("SHARDQ_GEMM4_GEMV", "1") == "1"
GEMV_MAX_M = 16
# Variant 4 with M > 8 where the ring kernel's row tiles alone leave SMs idle (N < 132 * 128 at 17 <= M <= 32 on an
# H200): the same kernel with K split in up to TC_SPLIT_PARTS parts (fp32 scratch, a second launch adding the parts
# in order) instead of the K-split variant 1 (H200, 17 <= M <= 32: 1.3-1.7x faster at N = 4096 and 11008; taking
# it also where the tiles fill the SMs was slower, 8192x28672 M = 32: 135 vs 113 us). SHARDQ_GEMM4_TC_SPLIT=0 keeps
# variant 1 there (for comparisons).
GEMM4_TC_SPLIT = os.environ.get("SHARDQ_GEMM4_TC_SPLIT", "1") == "1"
TC_SPLIT_PARTS = 4  # the launcher's kMaxParts (csrc/gemm_4bit_tc.cu): the scratch holds that many [M, N] sums
# fp32 activations (bitsandbytes' default compute dtype), M <= F32_MAX_M: csrc/gemm_4bit_f32.cu (fp32 dequantization
# and FMA on the CUDA cores, weights read once) instead of dequantize-to-fp32 + cuBLAS. SHARDQ_GEMM4_F32=0 keeps the
# latter (for comparisons).
GEMM4_F32 = os.environ.get("SHARDQ_GEMM4_F32", "1") == "1"
F32_MAX_M = 8
# M <= FLAT_MAX_M where every other small-M kernel refuses the layout (K % 32 != 0: rows starting mid-byte):
# csrc/gemm_4bit_flat.cu, reading the flat packed array, instead of dequantize + cuBLAS (H200, 4097x1000: 1.2-2.3x
# faster at every M <= 8 with 16-bit x, 2.0-3.4x with fp32 x; bench/RESULTS.md). SHARDQ_GEMM4_FLAT=0 switches it off.
GEMM4_FLAT = os.environ.get("SHARDQ_GEMM4_FLAT", "1") == "1"
FLAT_MAX_M = 8
# The kernel stages one token's x (K fp32 values) in shared memory at least; the planner counts on that only below
# the smallest per-block opt-in of the GPUs the library is built for (99 KB on sm_86 / sm_89).
F32_MIN_SMEM = 99 * 1024
# int8_linear for INT8_TC_MIN_M <= M <= INT8_TC_MAX_M: csrc/int8_gemm_tc.cu (int8 tensor cores, m16n8k32) after the
# prepare step, falling back where it refuses a shape; SHARDQ_INT8_TC=0 keeps the dp4a GEMV there. The kernel
# computes M up to 64, but above 32 the padded torch._int_mm GEMM + epilogue was faster (bench/RESULTS.md, H200).
INT8_TC = os.environ.get("SHARDQ_INT8_TC", "1") == "1"
INT8_TC_MIN_M, INT8_TC_MAX_M = 2, 32
# int8_linear for M <= INT8_FUSED_MAX_M: csrc/int8_gemv_fused.cu (one launch, the activation side inside every CTA;
# it computes M <= 4, but from M = 2 its per-CTA scan of x cost more than the two prepare launches + the tensor-core
# kernel on an H200, bench/RESULTS.md)
INT8_FUSED_MAX_M = 1
# Rows of W not 16-byte aligned (K % 32 != 0), 2 <= M <= INT8_ANY_MAX_M: the one-launch kernel's unaligned-row
# variant (staged q rows funnel-shifted onto aligned weight chunks) instead of prepare + the byte-loading dp4a GEMV.
INT8_ANY_MAX_M = 4
# int8_linear, M > SMALL_M: the activation prepare step copies up to this many outlier columns of x into a compact
# [M, cap] buffer for the epilogue (which also stages that many of W's in shared memory; more are read directly).
INT8_OUTLIER_CAP = 64
# Floats the prepare step's small-batch launches (M <= SMALL_M) keep past colmax's K: per-chunk outlier counts and row
# maxima (kPrepStats in csrc/int8_quant.cu).
INT8_PREP_STATS = 64 + 64 * 32
# SMALL_M < M <= WGMMA_MAX_M 4-bit on Hopper: csrc/gemm_4bit_wgmma.cu (weights dequantized in registers into the
# warpgroup MMA, no dequantized copy of W) where it takes the shape (compute capability 9.0, K % 64 == 0, blocksize
# >= 64); where its grid of 128-feature tiles covers less than WGMMA_MIN_FILL of the SMs and K >= WGMMA_SPLIT_MIN_K,
# K is split in up to WGMMA_MAX_SPLITS runs of at least WGMMA_MIN_SPLIT_TILES 64-column k-tiles (fp32 partials,
# summed in order by a second launch; H200: 11008x4096 M = 33..128 1.05-1.27x faster than dequantize + cuBLAS, but
# 4096x4096 0.80-0.95x, hence the K floor). Elsewhere dequantize + cuBLAS, which measured faster (H200,
# bench/RESULTS.md: the kernel reaches ~440 TFLOP/s, its wgmma skeleton and its dequantization each costing about a
# cuBLAS GEMM).
# SHARDQ_GEMM4_WGMMA=0 keeps dequantize + cuBLAS for every M (for comparisons).
GEMM4_WGMMA = os.environ.get("SHARDQ_GEMM4_WGMMA", "1") == "1"
WGMMA_MAX_M = 128
WGMMA_MIN_FILL = 0.5
WGMMA_MAX_SPLITS = 8
WGMMA_MIN_SPLIT_TILES = 8
WGMMA_SPLIT_MIN_K = 8192
# grouped_gemm_4bit (MoE experts): csrc/grouped_gemm_4bit.cu, one launch for all experts, while the rows per expert
# average at most GROUPED_MAX_AVG_ROWS (T <= GROUPED_MAX_AVG_ROWS * E) and always while a CUDA graph is captured;
# above that, eagerly, each expert with rows through gemm_4bit (one host sync for the offsets; its M > 32 kernels
# read each weight once where the grouped kernel re-reads a tile's weights for every 32-row pass).
# SHARDQ_GROUPED_MAX_ROWS sets the threshold (0: per expert wherever the call is eager).
GROUPED_MAX_AVG_ROWS = int(os.environ.get("SHARDQ_GROUPED_MAX_ROWS", "32"))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream(t: Tensor) -> int:
    """Raw handle of the current stream of t's device (what torch.cuda.current_stream().cuda_stream gives,
    without building a Stream object on every call)."""
    return torch._C._cuda_getCurrentRawStream(t.device.index)


def _same_device(device: torch.device, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but the input is on {device}: move the layer and its input to one device"
            )


class _on_device:
    """Make `device` current for the launch (the launchers query the current device)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.index != torch.cuda.current_device() else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _check_code(code: Tensor) -> None:
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"code must be an fp32 tensor of 16 values, got {code.dtype} {tuple(code.shape)}")


def _absmax_args(
    absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None, nested_offset: float, nblocks: int
) -> tuple[tuple, list[Tensor]]:
    """Launcher arguments (plain fp32 ptr, uint8 codes ptr, nested absmax ptr, nested code ptr, offset) and
    the contiguous tensors behind them, which the caller must keep alive until the launch."""
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {nblocks} (one per block)")
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be fp32 without double quant, got {absmax.dtype}")
        plain = absmax.contiguous()
        return (plain.data_ptr(), None, None, None, 0.0), [plain]
    if nested_code is None or nested_code.numel() != 256 or nested_code.dtype != torch.float32:
        raise ValueError("double quant needs nested_code as an fp32 tensor of 256 values")
    if absmax.dtype != torch.uint8 or nested_absmax.dtype != torch.float32:
        raise ValueError(
            f"double quant needs uint8 absmax codes and fp32 nested_absmax, got {absmax.dtype} and "
            f"{nested_absmax.dtype}"
        )
    if nested_absmax.numel() != -(-nblocks // 256):
        raise ValueError(f"nested_absmax has {nested_absmax.numel()} entries, expected ceil({nblocks}/256)")
    keep = [absmax.contiguous(), nested_absmax.contiguous(), nested_code.contiguous()]
    return (None, *(t.data_ptr() for t in keep), float(nested_offset)), keep


def gemm_4bit(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    in_features: int,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    nested_offset: float,
    bias: Tensor | None,
) -> Tensor:
    lib = _lib.load()
    if lib is None or x.dtype not in DTYPE_CODES:
        return _ref.gemm_4bit(
            x,
            packed,
            absmax,
            code,
            blocksize,
            out_features,
            in_features,
            nested_absmax,
            nested_code,
            nested_offset,
            bias,
        )
    n, k = out_features, in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the layer takes {k}")
    if packed.dtype != torch.uint8 or packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"packed must be uint8 with ceil({n}*{k}/2) bytes, got {packed.dtype} {packed.numel()}")
    _check_code(code)
    _same_device(
        x.device,
        packed=packed,
        absmax=absmax,
        code=code,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        bias=bias,
    )
    am, _keep = _absmax_args(absmax, nested_absmax, nested_code, nested_offset, -(-n * k // blocksize))
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    b = None if bias is None else bias.to(x.dtype).contiguous()
    packed, code = packed.contiguous(), code.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    with _on_device(x.device):
        if m <= SMALL_M and _gemm_4bit_small(lib, x2, packed, am, code, blocksize, n, k, b, out):
            pass
        elif m > SMALL_M and _gemm_4bit_wgmma(lib, x2, packed, am, code, blocksize, n, k, b, out):
            pass
        else:  # large M, and layouts the small-M kernels refuse (odd K, unaligned; fp32 beyond the fp32 kernel)
            _gemm_4bit_large(lib, x2, packed, am, code, blocksize, n, k, b, out)
    return out.reshape(*x.shape[:-1], n)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def wgmma_splits(m: int, n: int, k: int, device: torch.device) -> int:
    """How csrc/gemm_4bit_wgmma.cu runs x[m, k] @ W[n, k].T: 0 = not at all (M outside its range, a narrow grid
    with K too short to split, or switched off), else the number of K runs (1 = no split) that lets its grid of
    128-feature tiles cover WGMMA_MIN_FILL of the SMs."""
    if not GEMM4_WGMMA or not SMALL_M < m <= WGMMA_MAX_M:
        return 0
    ctas = -(-n // 128) * -(-m // (64 if m <= 64 else 128))
    sms = _sm_count(device.index)
    if ctas >= WGMMA_MIN_FILL * sms:
        return 1
    if k < WGMMA_SPLIT_MIN_K:
        return 0
    return max(1, min(-(-sms // ctas), WGMMA_MAX_SPLITS, (k // 64) // WGMMA_MIN_SPLIT_TILES))


def _gemm_4bit_wgmma(
    lib,
    x2: Tensor,
    packed: Tensor,
    am: tuple,
    code: Tensor,
    blocksize: int,
    n: int,
    k: int,
    b: Tensor | None,
    out: Tensor,
) -> bool:
    """csrc/gemm_4bit_wgmma.cu where the routing sends it (wgmma_splits); False if not, or if it refuses the shape
    or the device."""
    m = x2.shape[0]
    splits = wgmma_splits(m, n, k, x2.device)
    if splits == 0:
        return False
    ws = torch.empty(splits * m * n, dtype=torch.float32, device=x2.device) if splits > 1 else None
    args = (
        x2.data_ptr(),
        packed.data_ptr(),
        *am,
        code.data_ptr(),
        _ptr(b),
        out.data_ptr(),
        _ptr(ws),
        m,
        n,
        k,
        blocksize,
        splits,
        DTYPE_CODES[x2.dtype],
    )
    return _launch(lib.shardq_gemm_4bit_wgmma, args, _stream(x2), "gemm_4bit_wgmma")


def _gemm_4bit_small(
    lib,
    x2: Tensor,
    packed: Tensor,
    am: tuple,
    code: Tensor,
    blocksize: int,
    n: int,
    k: int,
    b: Tensor | None,
    out: Tensor,
) -> bool:
    """M <= SMALL_M: fp32 x through the fp32 kernel (M <= F32_MAX_M); for variant 4 the register-streaming GEMV
    (M <= GEMV_MAX_M), then the tensor-core ring kernel (with K in parts where its row tiles leave SMs idle), where
    they take the shape, else the K-split kernel; layouts all of those refuse through the flat-array kernel (M <=
    FLAT_MAX_M); False if every kernel refuses it."""
    m = x2.shape[0]
    pre = (x2.data_ptr(), packed.data_ptr(), *am, code.data_ptr(), _ptr(b), out.data_ptr())
    post = (m, n, k, blocksize, DTYPE_CODES[x2.dtype])
    args = pre + post
    stream = _stream(x2)
    flat = GEMM4_FLAT and m <= FLAT_MAX_M
    if x2.dtype == torch.float32:  # only the CUDA-core kernels keep fp32 products
        return (
            GEMM4_F32
            and m <= F32_MAX_M
            and _launch(lib.shardq_gemm_4bit_f32, args, stream, "gemm_4bit_f32")
            or flat
            and _launch(lib.shardq_gemm_4bit_flat, args, stream, "gemm_4bit_flat")
        )
    if GEMM4_VARIANT == 4 and GEMM4_GEMV and m <= GEMV_MAX_M:
        rc = lib.shardq_gemm_4bit_gemv(*args, stream)
        if rc == _lib.CUDA_ERROR_NOT_SUPPORTED and k % 256 == 0 and k >= 2048:  # x too large to stage: halve K
            ws = torch.empty(m * n, dtype=torch.float32, device=x2.device)
            rc = lib.shardq_gemm_4bit_gemv_split(*pre, ws.data_ptr(), *post, stream)
        if rc != _lib.CUDA_ERROR_NOT_SUPPORTED:
            _lib.check(rc, "gemm_4bit_gemv")
            return True
    if GEMM4_VARIANT == 4 and _launch(lib.shardq_gemm_4bit_tc, args, stream, "gemm_4bit_tc"):
        return True
    if GEMM4_VARIANT == 4 and GEMM4_TC_SPLIT and m > 8:
        ws = torch.empty(TC_SPLIT_PARTS * m * n, dtype=torch.float32, device=x2.device)
        if _launch(lib.shardq_gemm_4bit_tc_split, pre + (ws.data_ptr(),) + post, stream, "gemm_4bit_tc_split"):
            return True
    return (
        _launch(lib.shardq_gemm_4bit_small, args, stream, "gemm_4bit_small")
        or flat
        and _launch(lib.shardq_gemm_4bit_flat, args, stream, "gemm_4bit_flat")
    )


def _launch(fn, args: tuple, stream, name: str) -> bool:
    """Call a launcher: False if it refused the shape (cudaErrorNotSupported, nothing launched), else check it."""
    rc = fn(*args, stream)
    if rc == _lib.CUDA_ERROR_NOT_SUPPORTED:
        return False
    _lib.check(rc, name)
    return True


def _gemm_4bit_large(
    lib,
    x2: Tensor,
    packed: Tensor,
    am: tuple,
    code: Tensor,
    blocksize: int,
    n: int,
    k: int,
    b: Tensor | None,
    out: Tensor,
) -> None:
    """Large M: dequantize row chunks of W into scratch (at most DEQUANT_CHUNK_BYTES) and use cuBLAS."""
    rows = max(1, min(n, DEQUANT_CHUNK_BYTES // (k * x2.element_size())))
    w = torch.empty((rows, k), dtype=x2.dtype, device=x2.device)
    dt, stream = DTYPE_CODES[x2.dtype], _stream(x2)
    for n0 in range(0, n, rows):
        nr = min(rows, n - n0)
        wc = w[:nr]
        rc = lib.shardq_dequantize_4bit(
            packed.data_ptr(), *am, code.data_ptr(), wc.data_ptr(), n0 * k, nr * k, blocksize, dt, stream
        )
        _lib.check(rc, "dequantize_4bit")
        oc = out[:, n0 : n0 + nr]  # row stride n: cuBLAS writes the column block in place (ldc), no copy
        if b is None:
            torch.mm(x2, wc.t(), out=oc)
        else:
            torch.addmm(b[n0 : n0 + nr], x2, wc.t(), out=oc)


def dequantize_4bit(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype
) -> Tensor:
    lib = _lib.load()
    if lib is None or dtype not in DTYPE_CODES:
        return _ref.dequantize_4bit(packed, absmax, code, blocksize, shape, dtype)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed must be uint8 with ceil({numel}/2) bytes, got {packed.dtype} {packed.numel()}")
    _check_code(code)
    _same_device(packed.device, absmax=absmax, code=code)
    am, _keep = _absmax_args(absmax, None, None, 0.0, -(-numel // blocksize))
    out = torch.empty(list(shape), dtype=dtype, device=packed.device)
    packed, code = packed.contiguous(), code.contiguous()
    with _on_device(packed.device):
        rc = lib.shardq_dequantize_4bit(
            packed.data_ptr(),
            *am,
            code.data_ptr(),
            out.data_ptr(),
            0,
            numel,
            blocksize,
            DTYPE_CODES[dtype],
            _stream(packed),
        )
    _lib.check(rc, "dequantize_4bit")
    return out


def quantize_4bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    lib = _lib.load()
    if lib is None or A.dtype not in DTYPE_CODES:
        return _ref.quantize_4bit(A, code, blocksize)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    _check_code(code)
    _same_device(A.device, code=code)
    a, code = A.contiguous(), code.contiguous()
    n = a.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=a.device)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32, device=a.device)
    with _on_device(a.device):
        rc = lib.shardq_quantize_4bit(
            a.data_ptr(),
            code.data_ptr(),
            packed.data_ptr(),
            absmax.data_ptr(),
            n,
            blocksize,
            DTYPE_CODES[a.dtype],
            _stream(a),
        )
    _lib.check(rc, "quantize_4bit")
    return packed, absmax


def quantize_int8_rowwise(A: Tensor) -> tuple[Tensor, Tensor]:
    lib = _lib.load()
    if lib is None or A.dtype not in DTYPE_CODES or A.dim() == 0:
        return _ref.quantize_int8_rowwise(A)
    a = A.contiguous()
    cols = a.shape[-1]
    rows = a.numel() // cols if cols else 0
    q = torch.empty(a.shape, dtype=torch.int8, device=a.device)
    scale = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    with _on_device(a.device):
        rc = lib.shardq_quantize_int8_rowwise(
            a.data_ptr(), q.data_ptr(), scale.data_ptr(), rows, cols, DTYPE_CODES[a.dtype], _stream(a)
        )
    _lib.check(rc, "quantize_int8_rowwise")
    return q, scale


def _int8_scratch(m: int, k: int, device: torch.device, xo_bytes: int = 0) -> tuple[Tensor, dict[str, int]]:
    """One uint8 buffer for colmax f32[k + INT8_PREP_STATS], outlier list i32[k], count i32, row absmax f32[m], q
    int8[m, k] and xo_bytes for the compacted outlier columns of x (large M)."""
    sizes = {
        "colmax": 4 * (k + INT8_PREP_STATS),
        "list": 4 * k,
        "count": 4,
        "row_absmax": 4 * m,
        "q": m * k,
        "xo": xo_bytes,
    }
    offsets, pos = {}, 0
    for name, size in sizes.items():
        offsets[name] = pos
        pos += -(-size // 256) * 256
    return torch.empty(pos, dtype=torch.uint8, device=device), offsets


def int8_outlier_cap(m: int, k: int, threshold: float) -> int:
    """Outlier columns of x that int8_linear's prepare step compacts for the large-M epilogue (0: none)."""
    return min(k, INT8_OUTLIER_CAP) if m > SMALL_M and threshold > 0 else 0


def _int_mm_padded(q: Tensor, w: Tensor) -> Tensor:
    """int32 q @ w.T on the tensor cores (cuBLASLt through torch._int_mm), which needs K and N multiples of 8:
    other shapes are zero-padded (zeros add nothing to the integer sums); the result may have extra columns."""
    m, k = q.shape
    n = w.shape[0]
    kp, np_ = -(-k // 8) * 8, -(-n // 8) * 8
    if kp != k or np_ != n:
        qp = torch.zeros((m, kp), dtype=torch.int8, device=q.device)
        qp[:, :k] = q
        wp = torch.zeros((np_, kp), dtype=torch.int8, device=w.device)
        wp[:n, :k] = w
        q, w = qp, wp
    return torch._int_mm(q, w.t())


def _check_int8_args(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight takes {weight.shape[1]}")
    if scale.dtype != torch.float32 or scale.numel() != weight.shape[0]:
        raise ValueError(
            f"scale (SCB) must be fp32 with one value per output row ({weight.shape[0]}), got "
            f"{scale.dtype} {tuple(scale.shape)}"
        )
    _same_device(x.device, weight=weight, scale=scale, bias=bias)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    lib = _lib.load()
    if lib is None or x.dtype not in DTYPE_CODES:
        return _ref.int8_linear(x, weight, scale, bias, threshold)
    _check_int8_args(x, weight, scale, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    w, scb = weight.contiguous(), scale.contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    dt, stream = DTYPE_CODES[x.dtype], _stream(x)
    if m <= INT8_FUSED_MAX_M or k % 32 and m <= INT8_ANY_MAX_M:  # one launch: the activation side in every CTA
        with _on_device(x.device):
            rc = lib.shardq_int8_gemv_fused(
                x2.data_ptr(),
                w.data_ptr(),
                scb.data_ptr(),
                _ptr(b),
                out.data_ptr(),
                m,
                n,
                k,
                float(threshold),
                dt,
                stream,
            )
        if rc != _lib.CUDA_ERROR_NOT_SUPPORTED:
            _lib.check(rc, "int8_gemv_fused")
            return out.reshape(*x.shape[:-1], n)
    large = m > SMALL_M  # torch._int_mm + the epilogue, which reads x's outlier columns compacted by prepare
    xo_cap = int8_outlier_cap(m, k, threshold)
    buf, off = _int8_scratch(m, k, x.device, m * xo_cap * x2.element_size())
    base = buf.data_ptr()
    p = {name: base + o for name, o in off.items()}
    xo = p["xo"] if xo_cap else None
    with _on_device(x.device):
        rc = lib.shardq_int8_prepare(
            x2.data_ptr(),
            p["q"],
            p["row_absmax"],
            p["colmax"],
            p["list"],
            p["count"],
            xo,
            xo_cap,
            m,
            k,
            float(threshold),
            dt,
            stream,
        )
        _lib.check(rc, "int8_prepare")
        tail = (
            x2.data_ptr(),
            w.data_ptr(),
            scb.data_ptr(),
            p["list"],
            p["count"],
            _ptr(b),
            out.data_ptr(),
            m,
            n,
            k,
            dt,
            stream,
        )
        if INT8_TC and INT8_TC_MIN_M <= m <= INT8_TC_MAX_M:
            rc = lib.shardq_int8_gemm_tc(p["q"], p["row_absmax"], *tail)
            if rc != _lib.CUDA_ERROR_NOT_SUPPORTED:
                _lib.check(rc, "int8_gemm_tc")
                return out.reshape(*x.shape[:-1], n)
        if not large:
            rc = lib.shardq_int8_gemv(p["q"], p["row_absmax"], *tail)
            _lib.check(rc, "int8_gemv")
        else:
            q = buf[off["q"] : off["q"] + m * k].view(torch.int8).view(m, k)
            acc = _int_mm_padded(q, w)
            rc = lib.shardq_int8_epilogue(acc.data_ptr(), acc.stride(0), p["row_absmax"], xo, xo_cap, *tail)
            _lib.check(rc, "int8_epilogue")
    return out.reshape(*x.shape[:-1], n)


def grouped_gemm_4bit(
    x: Tensor,
    offsets: Tensor,
    packed: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    out_features: int,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    nested_offset: Tensor | None,
) -> Tensor:
    """MoE experts' 4-bit matmuls in one launch (small rows per expert, graph capture), else per expert (see
    GROUPED_MAX_AVG_ROWS). Offsets are trusted on the kernel path (checking them would need a host sync)."""
    args = (x, offsets, packed, absmax, code, blocksize, out_features, nested_absmax, nested_code, nested_offset)
    lib = _lib.load()
    if lib is None or x.dtype not in (torch.float16, torch.bfloat16):
        return _ref.grouped_gemm_4bit(*args)
    _ref.check_grouped_args(x, offsets, packed, absmax, code, blocksize, out_features)
    _same_device(
        x.device,
        offsets=offsets,
        packed=packed,
        absmax=absmax,
        code=code,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        nested_offset=nested_offset,
    )
    t, experts = x.shape[0], packed.shape[0]
    out = torch.empty((t, out_features), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    capturing = torch.cuda.is_current_stream_capturing()
    if not capturing and t > GROUPED_MAX_AVG_ROWS * experts:
        return _grouped_per_expert(args, out)
    if _grouped_launch(lib, args, out):
        return out
    if capturing:
        raise ValueError(
            f"grouped_gemm_4bit cannot be captured for this layout (K = {x.shape[1]}, blocksize {blocksize}): "
            "the kernel needs K % 128 == 0 and a power-of-two blocksize >= 32, and the per-expert path syncs"
        )
    return _grouped_per_expert(args, out)


def _grouped_launch(lib, args: tuple, out: Tensor) -> bool:
    """csrc/grouped_gemm_4bit.cu; False if it refuses the layout."""
    x, offsets, packed, absmax, code, blocksize, n, nested_absmax, nested_code, nested_offset = args
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be fp32 without double quant, got {absmax.dtype}")
        keep = [absmax.contiguous(), None, None, None, None]
    else:
        if nested_code is None or nested_offset is None or absmax.dtype != torch.uint8:
            raise ValueError("double quant needs uint8 absmax codes, nested_absmax, nested_code and nested_offset")
        keep = [
            None,
            absmax.contiguous(),
            *(v.float().contiguous() for v in (nested_absmax, nested_code, nested_offset)),
        ]
    x2, off = x.contiguous(), offsets.to(torch.int32).contiguous()
    w, c = packed.contiguous(), code.contiguous()
    t, k = x2.shape
    with _on_device(x.device):
        return _launch(
            lib.shardq_grouped_gemm_4bit,
            (x2.data_ptr(), off.data_ptr(), w.data_ptr(), *(_ptr(v) for v in keep), c.data_ptr(), out.data_ptr(),
             t, packed.shape[0], n, k, blocksize, DTYPE_CODES[x.dtype]),
            _stream(x),
            "grouped_gemm_4bit",
        )  # fmt: skip


def _grouped_per_expert(args: tuple, out: Tensor) -> Tensor:
    """Each expert with rows through gemm_4bit (its own routing: the tensor-core and wgmma kernels, or dequantize +
    cuBLAS); the offsets (and double quant's offsets) come to the host once."""
    x, offsets, packed, absmax, code, blocksize, n, nested_absmax, nested_code, nested_offset = args
    bounds = offsets.tolist()
    shifts = nested_offset.tolist() if nested_offset is not None else None
    for e, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        if stop <= start:
            continue
        na, nc, shift = (None, None, 0.0)
        if shifts is not None and nested_absmax is not None and nested_code is not None:
            na, nc, shift = nested_absmax[e], nested_code[e], float(shifts[e])
        xe = x[start:stop]
        out[start:stop] = gemm_4bit(xe, packed[e], absmax[e], code[e], blocksize, n, x.shape[1], na, nc, shift, None)
    return out


KERNELS: dict[str, Callable] = {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "gemm_4bit": gemm_4bit,
    "grouped_gemm_4bit": grouped_gemm_4bit,
    "quantize_int8_rowwise": quantize_int8_rowwise,
    "int8_linear": int8_linear,
}
