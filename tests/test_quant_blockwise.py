"""4-bit NF4/FP4 blockwise quantization and double quant: code books, packing, round trips, and bit-for-bit
agreement with bitsandbytes 0.50.2 (committed fixtures, tests/fixtures/bnb/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import shardq.kernels.ops  # noqa: F401
from shardq.formats import blockwise, codebooks

FIX = Path(__file__).parent / "fixtures" / "bnb"
FIXTURE_FILES = [p for p in (FIX / "blockwise.safetensors", FIX / "blockwise_cuda.safetensors") if p.exists()]


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["cases"])


def test_code_books_are_bitsandbytes_values():
    nf4 = codebooks.code_4bit("nf4")
    assert nf4.dtype == torch.float32 and nf4.shape == (16,)
    assert torch.all(nf4[1:] > nf4[:-1]) and nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1
    fp4 = codebooks.code_4bit("fp4")
    # e2m1 with bias 2 in bit order, divided by the largest magnitude 12
    expected = [0, 1 / 192, 2 / 3, 1, 1 / 3, 1 / 2, 1 / 6, 1 / 4]
    assert torch.allclose(fp4[:8], torch.tensor(expected), atol=1e-7)
    assert torch.equal(fp4[8:], -fp4[:8]) and torch.signbit(fp4[8])
    dyn = codebooks.dynamic_map()
    assert dyn.shape == (256,) and torch.all(dyn[1:] > dyn[:-1]) and dyn[-1] == 1.0 and (dyn == 0).sum() == 1
    assert codebooks.quant_type_of(nf4) == "nf4" and codebooks.quant_type_of(fp4) == "fp4"
    with pytest.raises(ValueError, match="neither NF4 nor FP4"):
        codebooks.quant_type_of(dyn[:16])
    with pytest.raises(ValueError, match="quant_type='int4' is unknown"):
        codebooks.code_4bit("int4")


def test_packing_puts_first_element_in_high_nibble():
    q = torch.tensor([1, 2, 3, 4, 15])
    packed = blockwise.pack_nibbles(q)
    assert packed.shape == (3, 1) and packed.flatten().tolist() == [0x12, 0x34, 0xF0]
    assert blockwise.unpack_nibbles(packed, 5).tolist() == q.tolist()


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_values_on_the_code_quantize_exactly(qt):
    code = codebooks.code_4bit(qt)
    A = (code[torch.randperm(16)].repeat(8) * 3.5)  # every block's absmax is 3.5
    packed, absmax = blockwise.quantize_4bit_ref(A, code, 32)
    assert torch.all(absmax == 3.5)
    back = blockwise.dequantize_4bit_ref(packed, absmax, code, 32, [128], torch.float32)
    assert torch.equal(back, A)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,bs", [((1,), 64), ((3, 5), 32), ((17, 33), 64), ((100, 129), 128), ((7, 1000), 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_error_is_within_half_a_code_step(qt, shape, bs, dtype):
    g = torch.Generator().manual_seed(abs(hash((qt, shape, bs, str(dtype)))) % 2**31)
    A = torch.randn(shape, generator=g)
    A.view(-1)[:: max(1, A.numel() // 7)] *= 30  # outliers
    A = A.to(dtype)
    code = codebooks.code_4bit(qt)
    packed, absmax = torch.ops.shardq.quantize_4bit(A, code, bs)
    n = A.numel()
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (math.ceil(n / bs),) and absmax.dtype == torch.float32
    flat = A.float().reshape(-1)
    ref_absmax = torch.nn.functional.pad(flat.abs(), (0, absmax.numel() * bs - n)).reshape(-1, bs).amax(1)
    assert torch.equal(absmax, ref_absmax)
    back = torch.ops.shardq.dequantize_4bit(packed, absmax, code, bs, list(shape), dtype)
    assert back.shape == shape and back.dtype == dtype
    gaps = (code.sort().values.diff().max() / 2).item()
    per_elem = absmax.repeat_interleave(bs)[:n]
    err = (back.float().reshape(-1) - flat).abs()
    rounding = back.float().abs().reshape(-1) * (2**-7 if dtype == torch.bfloat16 else 2**-10)
    assert torch.all(err <= gaps * per_elem * (1 + 1e-6) + rounding + 1e-30)
    if dtype != torch.float32:
        return
    # the codes are the nearest: quantizing the dequantized values again changes nothing
    again, absmax2 = torch.ops.shardq.quantize_4bit(back.float(), code, bs)
    twice = torch.ops.shardq.dequantize_4bit(again, absmax2, code, bs, list(shape), torch.float32)
    assert torch.equal(twice, back)


def test_all_zero_block_round_trips_to_zero():
    A = torch.zeros(2, 64)
    A[1] = torch.randn(64)
    packed, absmax = blockwise.quantize_4bit_ref(A, codebooks.code_4bit("nf4"), 64)
    assert absmax[0] == 0
    back = blockwise.dequantize_4bit_ref(packed, absmax, codebooks.code_4bit("nf4"), 64, [2, 64], torch.float32)
    assert torch.all(back[0] == 0) and torch.isfinite(back).all()


@pytest.mark.parametrize("nblocks", [1, 5, 256, 257, 1000])
def test_double_quant_round_trip(nblocks):
    g = torch.Generator().manual_seed(nblocks)
    absmax = torch.rand(nblocks, generator=g) * 0.2 + 0.01
    absmax[0] = 3.0  # an outlier block
    dq = blockwise.quantize_absmax(absmax, codebooks.dynamic_map())
    assert dq.q.dtype == torch.uint8 and dq.q.shape == (nblocks,)
    assert dq.nested_absmax.shape == (math.ceil(nblocks / 256),)
    assert torch.isclose(dq.offset, absmax.mean())
    back = blockwise.dequantize_absmax(dq.q, dq.nested_absmax, dq.code, dq.offset)
    # the dynamic map's relative step near 1 is < 1/127 of the nested absmax
    bound = dq.nested_absmax.repeat_interleave(256)[:nblocks] / 100
    assert torch.all((back - absmax).abs() <= bound + 1e-7)


def _fixture_cases():
    for path in FIXTURE_FILES:
        _, meta = _load(path)
        for case in meta:
            yield pytest.param(path, case, id=f"{path.stem}-{case}")


@pytest.mark.parametrize("path,case", list(_fixture_cases()))
def test_matches_bitsandbytes_bit_for_bit(path, case):
    t, meta = _load(path)
    m = meta[case]
    A, qt, bs = t[f"{case}.A"], m["quant_type"], m["blocksize"]
    code = codebooks.code_4bit(qt)
    assert torch.equal(t[f"{case}.quant_map"], code)
    packed, absmax = torch.ops.shardq.quantize_4bit(A, code, bs)
    ref_packed = t[f"{case}.packed"]
    on_gpu = "cuda" in path.stem
    if qt == "fp4" or on_gpu:
        # bitsandbytes' CPU backend rounds FP4 with its own midpoints and sign of zero; shardq follows the CUDA
        # kernel, whose scaling (a reciprocal, reductions) can differ by an ulp. So codes may differ only where
        # a value sits on a boundary between two codes (or rounds to zero): check exactly that.
        ours, theirs = blockwise.unpack_nibbles(packed, A.numel()), blockwise.unpack_nibbles(ref_packed, A.numel())
        diff = torch.nonzero(ours != theirs).flatten()
        scaled = A.float().reshape(-1)[diff] / absmax.repeat_interleave(bs)[diff]
        a, b = code[ours[diff]], code[theirs[diff]]
        on_boundary = ((scaled - a).abs() - (scaled - b).abs()).abs() <= 1e-6 * scaled.abs() + 1e-7
        assert bool(on_boundary.all())
    else:
        assert torch.equal(packed, ref_packed)
    qs = json.loads(bytes(t[f"{case}.quant_state.bitsandbytes__{qt}"].tolist()).decode())
    assert qs["shape"] == m["shape"] and qs["blocksize"] == bs and qs["quant_type"] == qt
    if m["double_quant"]:
        dq = blockwise.quantize_absmax(absmax, codebooks.dynamic_map())
        assert torch.equal(t[f"{case}.nested_quant_map"], dq.code) and qs["nested_blocksize"] == 256
        # the offset is a mean: a GPU reduction may round it (and so the nested absmax) an ulp differently
        close = dict(rtol=1e-6, atol=0) if on_gpu else dict(rtol=0, atol=0)
        assert torch.allclose(t[f"{case}.nested_absmax"], dq.nested_absmax, **close)
        assert torch.allclose(torch.tensor(qs["nested_offset"]), dq.offset, **close)
        mismatch = (t[f"{case}.absmax"].int() - dq.q.int()).abs()
        assert mismatch.max() <= (1 if on_gpu else 0) and (mismatch > 0).float().mean() <= 0.01
        real = blockwise.dequantize_absmax(t[f"{case}.absmax"], t[f"{case}.nested_absmax"], dq.code,
                                           qs["nested_offset"])
    else:
        assert torch.equal(t[f"{case}.absmax"], absmax)
        real = absmax
    dtype = getattr(torch, m["dtype"])
    back = torch.ops.shardq.dequantize_4bit(ref_packed, real, code, bs, m["shape"], dtype)
    assert torch.equal(back, t[f"{case}.dequant"])


def test_op_errors_name_the_problem():
    code = codebooks.code_4bit("nf4")
    packed, absmax = blockwise.quantize_4bit_ref(torch.randn(8, 64), code, 64)
    with pytest.raises(RuntimeError, match="packed holds 256 bytes, expected"):
        torch.ops.shardq.dequantize_4bit(packed, absmax, code, 64, [8, 65], torch.float32)
    with pytest.raises(RuntimeError, match="absmax has 8 entries"):
        torch.ops.shardq.dequantize_4bit(packed, absmax, code, 32, [8, 64], torch.float32)
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        torch.ops.shardq.dequantize_4bit(packed.to(torch.int32), absmax, code, 64, [8, 64], torch.float32)
    with pytest.raises(RuntimeError, match="code must be fp32"):
        torch.ops.shardq.dequantize_4bit(packed, absmax, code.half(), 64, [8, 64], torch.float32)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_chunked_reference_equals_one_pass(qt, monkeypatch):
    g = torch.Generator().manual_seed(9)
    A = torch.randn(37, 129, generator=g)
    code = codebooks.code_4bit(qt)
    whole = blockwise.quantize_4bit_ref(A, code, 64)
    back = blockwise.dequantize_4bit_ref(*whole, code, 64, [37, 129], torch.float32)
    monkeypatch.setattr(blockwise, "CHUNK_ELEMS", 256)  # 19 chunks, the last one short and odd
    chunked = blockwise.quantize_4bit_ref(A, code, 64)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    assert torch.equal(blockwise.dequantize_4bit_ref(*whole, code, 64, [37, 129], torch.float32), back)
