"""LLM.int8() in plain PyTorch: row-wise int8 quantization and the mixed-precision matmul (reference/CPU path).

Weights are int8 with one fp32 absmax per output row (`SCB`), weight = q * SCB / 127. At run time the input
columns holding an outlier (|x| > threshold in any row) are multiplied in the input's dtype against the
dequantized weight columns; the other columns are quantized per row (absmax/127), multiplied in int8 with
exact int32 accumulation and rescaled by row_absmax * SCB / 127**2; the two parts are summed in fp32.
"""

from __future__ import annotations

import torch

_TINY = 1e-38
INV_127_SQ = 1.0 / (127.0 * 127.0)


# Elements per step of the reference: bounds its fp32/fp64 temporaries whatever the weight's size.
CHUNK_ELEMS = 1 << 22


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about CHUNK_ELEMS elements each (at least one row)."""
    step = max(1, CHUNK_ELEMS // max(1, cols))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def quantize_rowwise_ref(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 q = round(A * 127 / absmax_row) and fp32 absmax per row (over the last dim)."""
    A2 = A.reshape(-1, A.shape[-1])
    q = torch.empty(A2.shape, dtype=torch.int8, device=A.device)
    absmax = torch.zeros(A2.shape[0], dtype=torch.float32, device=A.device)
    if A2.shape[1]:
        for start, stop in _row_chunks(*A2.shape):
            a = A2[start:stop].float()
            m = a.abs().amax(dim=-1)
            q[start:stop] = torch.round(a * (127.0 / m.clamp_min(_TINY)).unsqueeze(-1)).to(torch.int8)
            absmax[start:stop] = m
    return q.reshape(A.shape), absmax.reshape(A.shape[:-1])


def dequantize_rowwise_ref(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight = q * SCB / 127, computed in fp32 and cast to `dtype`."""
    return (q.float() * (scale.float() / 127.0).unsqueeze(-1)).to(dtype)


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices (int64) of input columns with |x| > threshold in any row; empty if threshold <= 0."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.int64, device=x2.device)
    return torch.nonzero((x2.abs() > threshold).any(dim=0)).reshape(-1)


def int8_matmul_exact(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """int32 qa @ qb.T for int8 operands, exact. On the CPU torch's integer GEMM (`_int_mm`, int32 accumulation);
    elsewhere, and where that is unavailable, int8 products summed in fp64 (integers below 2**53), in slices of
    qb's rows so the fp64 copies stay small. The CUDA path never uses this: it stays an independent oracle for
    the kernels, which use cuBLASLt's integer GEMM themselves."""
    if qa.device.type == "cpu" and qa.shape[0] and qb.shape[0] and qa.shape[1]:
        try:
            return torch._int_mm(qa.contiguous(), qb.contiguous().T)
        except (RuntimeError, NotImplementedError):
            pass
    out = torch.empty(qa.shape[0], qb.shape[0], dtype=torch.int32, device=qa.device)
    a = qa.double()
    for start, stop in _row_chunks(*qb.shape):
        out[:, start:stop] = (a @ qb[start:stop].double().T).to(torch.int32)
    return out


def int8_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """LLM.int8() `x @ W.T + bias` in `x.dtype`, for any leading dims of `x` (see the module docstring)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    cols = outlier_columns(x2, threshold)
    xf = x2.float()
    if cols.numel():
        xf = xf.clone()
        xf[:, cols] = 0.0
    qx, row_absmax = quantize_rowwise_ref(xf)
    acc = int8_matmul_exact(qx, weight)
    out = acc.float() * (row_absmax.unsqueeze(1) * scale.float().unsqueeze(0)) * INV_127_SQ
    if cols.numel():
        w_cols = dequantize_rowwise_ref(weight[:, cols], scale, x.dtype)
        out = out + (x2[:, cols] @ w_cols.T).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*lead, weight.shape[0])
