"""Code books of the stored formats, value for value the ones bitsandbytes uses, so checkpoints interoperate.

NF4 holds the 16 normal-quantile levels of QLoRA; FP4 is a 1-sign/2-exponent/1-mantissa float listed in bit
order (index = code); the dynamic 8-bit map is the signed map that double quant uses for the absmax statistics.
All are fp32 and built on demand (no tensors are created at import).
"""

from __future__ import annotations

import functools

import torch

# QLoRA's NormalFloat4 levels, sorted; index = 4-bit code.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (e2m1, exponent bias 2) in bit order: codes 0-7 positive, 8-15 the same magnitudes negative.
# The magnitudes are divided by the largest (12) so that the code spans [-1, 1].
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes' CUDA kernel picks an FP4 code by comparing |x| (scaled to [0, 1]) against these fp32 literals
# with `>`; they are close to, but not all exactly, the midpoints between neighbouring magnitudes, and using
# them reproduces its bytes also for values on a boundary (frequent with bf16 inputs).
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
# the 3-bit magnitude codes in increasing value: 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1
FP4_MAGNITUDE_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    raise ValueError(f"quant_type={quant_type!r} is unknown: use one of {QUANT_TYPES}")


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh fp32 [16] code book for `quant_type` ("nf4" or "fp4") on `device`."""
    return _code_cpu(quant_type).to(device, copy=True)


def quant_type_of(code: torch.Tensor) -> str:
    """Recognise a stored 4-bit code book; raises if it is neither NF4 nor FP4."""
    c = code.detach().float().cpu().reshape(-1)
    for qt in QUANT_TYPES:
        if c.numel() == 16 and torch.allclose(c, _code_cpu(qt), atol=1e-6, rtol=0):
            return qt
    raise ValueError(f"4-bit code book {c.tolist()} is neither NF4 nor FP4")


@functools.cache
def _dynamic_cpu() -> torch.Tensor:
    # Signed dynamic map with 7 exponent steps: for step i, 2**i evenly spaced fractions in [0.1, 1]
    # (bin midpoints) scaled by 10**(i-6), mirrored for the sign, plus 0 and 1. Computed in fp32
    # step by step so the values are bit-identical to bitsandbytes' create_dynamic_map().
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh fp32 [256] copy of the signed dynamic 8-bit map (sorted), used for double quant."""
    return _dynamic_cpu().to(device, copy=True)
