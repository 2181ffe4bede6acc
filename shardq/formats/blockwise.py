"""Blockwise 4-bit quantization (NF4/FP4) and double quant, in plain PyTorch: the reference and CPU path.

Layout (bitsandbytes-compatible): the weight is flattened row-major and cut into blocks of `blocksize`
elements (the last block may be short); each block is scaled by its absmax into [-1, 1] and every value
replaced by the index of the nearest code-book entry; two codes share a byte, the first in the high nibble.
Double quant stores the fp32 absmax values again as 8-bit codes of `absmax - mean(absmax)` in blocks of 256
with the signed dynamic map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shardq.config import NESTED_BLOCKSIZE
from shardq.formats import codebooks

_TINY = 1e-38  # floor for an all-zero block's absmax: its codes are zero either way


def n_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """A flat tensor as [nblocks, blocksize] rows, the short last block zero-padded (a view when none is short)."""
    pad = -flat.numel() % blocksize
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).reshape(-1, blocksize)


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 absmax of each block of a flat fp32 tensor (the last block may be short)."""
    return _blocks(flat, blocksize).abs().amax(dim=1)


def _scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each value times 1/absmax of its block (a multiply by the reciprocal, as the CUDA kernels do)."""
    inv = 1.0 / absmax.clamp_min(_TINY)
    return (_blocks(flat, blocksize) * inv[:, None]).view(-1)[: flat.numel()]


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest entry of `code` for each value; a value on a midpoint takes the lower entry
    (bitsandbytes' CUDA kernels compare with `>`). FP4 follows bitsandbytes' CUDA kernel exactly: magnitude
    against its threshold literals, the sign bit for negatives (so tiny negatives become -0)."""
    code = code.to(device=scaled.device, dtype=torch.float32)
    if code.numel() == 16 and torch.equal(code, codebooks.code_4bit("fp4", code.device)):
        return _nearest_fp4(scaled)
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, mids, out_int32=True)]


def _nearest_fp4(scaled: torch.Tensor) -> torch.Tensor:
    dev = scaled.device
    thresholds = torch.tensor(codebooks.FP4_THRESHOLDS, dtype=torch.float32, device=dev)
    magnitude_codes = torch.tensor(codebooks.FP4_MAGNITUDE_CODES, dtype=torch.uint8, device=dev)
    q = magnitude_codes[torch.bucketize(scaled.abs(), thresholds, out_int32=True)]
    return q | (scaled < 0).to(torch.uint8) << 3


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [ceil(n/2), 1] from n 4-bit codes, the first of each pair in the high nibble (odd n: pad 0)."""
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    pairs = q.view(-1, 2)
    return (pairs[:, 0] << 4 | pairs[:, 1]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int64 codes [numel] from a packed uint8 tensor (high nibble first)."""
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """fp32 [256, 2]: the two code values each packed byte stands for (high nibble first)."""
    b = torch.arange(256, device=code.device)
    return torch.stack([code[b >> 4], code[b & 0xF]], dim=1)


# Elements handled per step (a multiple of every blocksize): bounds the fp32/int64 temporaries of the reference to
# a few hundred MB whatever the weight's size, so quantize-on-load without the CUDA kernels stays within budgets.
CHUNK_ELEMS = 1 << 22


def quantize_4bit_ref(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of `A` to the 16-entry `code`: (packed uint8 [ceil(n/2),1], absmax fp32)."""
    flat = A.reshape(-1)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=A.device)
    absmax = torch.empty(n_blocks(n, blocksize), dtype=torch.float32, device=A.device)
    for start in range(0, n, CHUNK_ELEMS):
        part = flat[start : start + CHUNK_ELEMS].float()
        p, a = _quantize_chunk(part, code, blocksize)
        packed[start // 2 : start // 2 + p.shape[0]] = p
        absmax[start // blocksize : start // blocksize + a.numel()] = a
    return packed, absmax


def _quantize_chunk(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = _block_absmax(flat, blocksize)
    scaled = _scale_blocks(flat, absmax, blocksize).clamp(-1, 1)
    # the odd tail is padded with a quantized 0.0, as the CUDA kernel loads 0 past the end
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    return pack_nibbles(nearest_code(scaled, code)), absmax


def dequantize_4bit_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: list[int] | tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of `quantize_4bit_ref`: code value times block absmax, computed in fp32, cast to `dtype`."""
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    table = _pair_table(code.to(device=packed.device, dtype=torch.float32))
    flat_packed, absmax = packed.reshape(-1), absmax.float()
    for start in range(0, numel, CHUNK_ELEMS):
        stop = min(numel, start + CHUNK_ELEMS)
        values = table[flat_packed[start // 2 : (stop + 1) // 2].long()].view(-1)[: stop - start]
        scale = absmax[start // blocksize : n_blocks(stop, blocksize)]
        out[start:stop] = (_blocks(values, blocksize) * scale[:, None]).view(-1)[: stop - start]
    return out.reshape(shape)


# ---- double quant: the absmax statistics as 8-bit dynamic codes in blocks of 256 ----


@dataclass
class NestedAbsmax:
    """Double-quantized absmax: real absmax[i] = code[q[i]] * nested_absmax[i // 256] + offset."""

    q: torch.Tensor  # uint8 [nblocks]
    nested_absmax: torch.Tensor  # fp32 [ceil(nblocks / 256)]
    code: torch.Tensor  # fp32 [256], the signed dynamic map
    offset: torch.Tensor  # fp32 scalar, mean of the absmax values


def quantize_absmax(absmax: torch.Tensor, dyn_code: torch.Tensor) -> NestedAbsmax:
    """Double quant of fp32 absmax values: subtract their mean, quantize blockwise (256) to `dyn_code`."""
    absmax = absmax.float()
    offset = absmax.mean()
    centred = absmax - offset
    nested = _block_absmax(centred, NESTED_BLOCKSIZE)
    scaled = _scale_blocks(centred, nested, NESTED_BLOCKSIZE)
    q = nearest_code(scaled, dyn_code).to(torch.uint8)
    return NestedAbsmax(q=q, nested_absmax=nested, code=dyn_code.float(), offset=offset)


def dequantize_absmax(
    q: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor, offset: float | torch.Tensor
) -> torch.Tensor:
    """fp32 absmax from double-quantized statistics."""
    vals = code.to(device=q.device, dtype=torch.float32)[q.reshape(-1).to(torch.int64)]
    scale = nested_absmax.float().repeat_interleave(NESTED_BLOCKSIZE)[: q.numel()]
    return vals * scale + offset
