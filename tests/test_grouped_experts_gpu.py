"""csrc/grouped_gemm_4bit.cu (shardq::grouped_gemm_4bit on the GPU) against an fp64 reference, and the grouped
experts forward against the eager loop (skipped without a GPU or without the kernels library).

Fresh random inputs every run (seeded from the clock, printed on failure), outlier columns of x and outlier weights,
outputs poisoned with NaN through the caching allocator and checked to be fully written. Shapes: Mixtral's gate_up
(8 x 28672 x 4096) and down (8 x 4096 x 14336), ragged and small ones; a layer's tokens 1, 2, 16, 64, 512 routed
top-2 at random, some experts never hit (their scales poisoned with NaN: reading them would show). Tolerance: a
small multiple of the error that the same products in the same precision through torch make against fp64.
"""

from __future__ import annotations

import functools
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import shardq.kernels.ops  # noqa: E402,F401
from shardq.config import QuantConfig  # noqa: E402
from shardq.kernels import cuda_ops, lib  # noqa: E402
from shardq.quant import experts as qexperts  # noqa: E402
from shardq.quant.experts import QuantizedExperts  # noqa: E402
from _f_numerics import rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEED = int(time.time() * 1000) % 2**31
DEV = "cuda"
MIXTRAL_GATE_UP, MIXTRAL_DOWN = (8, 28672, 4096), (8, 4096, 14336)
TOKENS = [1, 2, 16, 64, 512]
VARIANTS = {  # name -> (method, blocksize, double quant)
    "nf4": ("nf4", 64, False),
    "nf4-dq": ("nf4", 64, True),
    "fp4-128": ("fp4", 128, False),
    "fp4-dq-256": ("fp4", 256, True),
}


@pytest.fixture(autouse=True)
def grouped_on(monkeypatch):
    """The grouped forward is off by default until these tests pass on a GPU; they test it switched on."""
    monkeypatch.setattr(qexperts, "GROUPED_EXPERTS", True)


@pytest.fixture(scope="module", autouse=True)
def _library():
    if lib.load() is None:
        pytest.skip(f"kernels library unavailable: {lib.error()}")


def _gen(*key) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed((SEED + hash(key)) % 2**31)


@functools.lru_cache(maxsize=8)
def _stack(e: int, n: int, k: int, variant: str) -> QuantizedExperts:
    """E random [n, k] experts (outlier weights every 97th column) quantized on the GPU, expert by expert."""
    method, bs, dq = VARIANTS[variant]
    cfg = QuantConfig(method=method, blocksize=bs, double_quant=dq)
    g = _gen("stack", e, n, k, variant)
    s = QuantizedExperts(e, n, k, cfg, device="meta", dtype=torch.bfloat16)
    parts = []
    for _ in range(e):
        w = torch.randn(n, k, device=DEV, generator=g)
        w[:, ::97] *= 8.0
        parts.append(qexperts._quantize_4bit(w, method, bs, dq))
        del w
    s.set_quantized({key: torch.stack([p[key] for p in parts]) for key in parts[0]})
    return s


def _args(s: QuantizedExperts, x: torch.Tensor, offsets: torch.Tensor) -> tuple:
    nested = (s.nested_absmax, s.nested_quant_map, s.nested_offset) if s.double_quant else (None, None, None)
    return (x, offsets, s.weight, s.absmax, s.quant_map, s.blocksize, s.out_features, *nested)


def _routed(tokens: int, e: int, g: torch.Generator, hit: int | None = None) -> list[int]:
    """Rows per expert of `tokens` tokens routed top-2 (top-1 for one expert) among the first `hit` experts."""
    hit = hit or e
    top = min(2, hit)
    idx = torch.stack([torch.randperm(hit, device=DEV, generator=g)[:top] for _ in range(tokens)])
    return torch.bincount(idx.reshape(-1), minlength=e).tolist()


def _inputs(rows: list[int], k: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(sum(rows), k, device=DEV, generator=g)
    x[:, :: max(1, k // 8)] *= 20.0
    offsets = torch.tensor([0, *rows], device=DEV).cumsum(0)
    return x.to(dtype), offsets


def _check(s: QuantizedExperts, x: torch.Tensor, offsets: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Run the op on NaN-poisoned memory; compare every expert's rows with fp64; returns the output."""
    torch.full((x.shape[0] * s.out_features,), float("nan"), dtype=x.dtype, device=DEV)  # freed: out reuses it
    out = torch.ops.shardq.grouped_gemm_4bit(*_args(s, x, offsets))
    assert out.shape == (x.shape[0], s.out_features) and out.dtype == x.dtype
    assert torch.isfinite(out).all(), f"seed {SEED}: output not fully written (or an unhit expert read)"
    start, ref, same = 0, [], []
    for e, r in enumerate(rows):
        if r:
            w = s.expert(e, torch.float32)
            ref.append(x[start : start + r].double() @ w.double().T)
            same.append(F.linear(x[start : start + r], w.to(x.dtype)))
        start += r
    ref_t, same_t = torch.cat(ref), torch.cat(same)
    tol = 4 * rel_err(same_t, ref_t) + 1e-5
    err = rel_err(out, ref_t)
    assert err <= tol, f"seed {SEED}: rel err {err:.3e} > {tol:.3e}"
    return out


def _poison_unhit(s: QuantizedExperts, rows: list[int]) -> None:
    """NaN scales for experts without rows (undone by _restore): the kernel must not read them."""
    for e, r in enumerate(rows):
        if not r:
            (s.nested_absmax if s.double_quant else s.absmax)[e].fill_(float("nan"))


def _restore(s: QuantizedExperts, saved: torch.Tensor) -> None:
    (s.nested_absmax if s.double_quant else s.absmax).copy_(saved)


def _direct(s: QuantizedExperts, x: torch.Tensor, offsets: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The launcher itself (proves which kernel the op ran): (rc, output)."""
    out = torch.empty((x.shape[0], s.out_features), dtype=x.dtype, device=DEV)
    return cuda_ops._grouped_launch(lib.load(), _args(s, x, offsets), out), out


CASES = [
    (MIXTRAL_GATE_UP, "nf4", torch.bfloat16),
    (MIXTRAL_DOWN, "nf4", torch.float16),
    (MIXTRAL_GATE_UP, "nf4-dq", torch.float16),
    (MIXTRAL_DOWN, "nf4-dq", torch.bfloat16),
    ((4, 1000, 1024), "fp4-128", torch.float16),  # N not a multiple of the 16-feature tile
    ((3, 200, 384), "fp4-dq-256", torch.bfloat16),  # 3 pieces of 128 columns: 5 of 8 warps idle
    ((1, 64, 2048), "nf4", torch.float16),
]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape,variant,dtype", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_kernel_matches_fp64(monkeypatch, shape, variant, dtype, tokens):
    monkeypatch.setattr(cuda_ops, "GROUPED_MAX_AVG_ROWS", 10**9)  # the grouped kernel at every size
    e, n, k = shape
    s = _stack(e, n, k, variant)
    g = _gen("kernel", shape, variant, dtype, tokens)
    rows = _routed(tokens, e, g, hit=max(1, e - 2))  # the last two experts never hit
    x, offsets = _inputs(rows, k, dtype, g)
    saved = (s.nested_absmax if s.double_quant else s.absmax).clone()
    _poison_unhit(s, rows)
    try:
        out = _check(s, x, offsets, rows)
        rc, direct = _direct(s, x, offsets)
        assert rc, "the kernel refused a layout it should take"
        assert torch.equal(direct, out), "the op did not run the grouped kernel"
    finally:
        _restore(s, saved)


@pytest.mark.parametrize("tokens", [64, 512])
def test_default_routing_per_expert_at_large_rows(tokens):
    """Eagerly, more than GROUPED_MAX_AVG_ROWS rows per expert on average go expert by expert through gemm_4bit."""
    e, n, k = 8, 4096, 4096
    s = _stack(e, n, k, "nf4")
    g = _gen("routing", tokens)
    rows = _routed(tokens, e, g)
    x, offsets = _inputs(rows, k, torch.float16, g)
    _check(s, x, offsets, rows)


def test_refused_layout_runs_per_expert():
    e, n, k = 3, 96, 200  # K % 128 != 0: the kernel refuses, each expert goes through gemm_4bit
    s = _stack(e, n, k, "nf4")
    g = _gen("refused")
    rows = [2, 0, 3]
    x, offsets = _inputs(rows, k, torch.bfloat16, g)
    assert not _direct(s, x, offsets)[0]
    _check(s, x, offsets, rows)


def test_rows_with_every_expert_empty_but_one():
    s = _stack(*MIXTRAL_DOWN, "nf4")
    g = _gen("one")
    rows = [0, 0, 0, 0, 0, 7, 0, 0]
    x, offsets = _inputs(rows, MIXTRAL_DOWN[2], torch.float16, g)
    _check(s, x, offsets, rows)


@pytest.mark.parametrize("tokens", [1, 16, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_capture_with_new_routing(tokens, dtype):
    """Captured once, replayed with new x and new offsets (other experts hit): equal to the eager kernel's output."""
    e, n, k = 8, 2048, 1024
    s = _stack(e, n, k, "nf4-dq")
    g = _gen("graph", tokens, dtype)
    rows = _routed(tokens, e, g)
    x, offsets = _inputs(rows, k, dtype, g)
    fn = lambda xx, oo: torch.ops.shardq.grouped_gemm_4bit(*_args(s, xx, oo))  # noqa: E731
    fn(x, offsets)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, offsets)
    rows2 = _routed(tokens, e, g, hit=3)
    x2, offsets2 = _inputs(rows2, k, dtype, g)
    x.copy_(x2)
    offsets.copy_(offsets2)
    graph.replay()
    torch.cuda.synchronize()
    assert _direct(s, x2, offsets2)[0]
    assert torch.equal(out, _direct(s, x2, offsets2)[1]), f"seed {SEED}: graph replay differs from eager"


# ---- the experts forward on the GPU: tiny Mixtral (kernel-friendly dims) through the grouped op vs the eager loop


def _tiny_mixtral(dtype: torch.dtype):
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(DEV, dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seq", [1, 8, 300])
def test_experts_forward_matches_eager_loop(monkeypatch, dtype, seq):
    from shardq.quant.convert import quantize_model

    q = quantize_model(_tiny_mixtral(dtype), "nf4")
    mods = [m for m in q.modules() if isinstance(m._modules.get("gate_up_proj"), QuantizedExperts)]
    assert mods and all(m.config._experts_implementation == qexperts.IMPLEMENTATION for m in mods)
    ids = torch.randint(0, 256, (2, seq), device=DEV, generator=_gen("ids", seq))
    calls = []
    real = qexperts.grouped_matmul
    monkeypatch.setattr(qexperts, "grouped_matmul", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = q(input_ids=ids).logits.float()
        assert len(calls) == 2 * len(mods), "the grouped forward did not run on the GPU"
        for m in mods:
            qexperts.set_implementation(m, "eager")
        want = q(input_ids=ids).logits.float()
    err = rel_err(got, want)
    assert err < (5e-3 if dtype == torch.float16 else 2e-2), f"seed {SEED}: rel err {err:.3e}"


def test_experts_forward_in_a_cuda_graph():
    from shardq.quant.convert import quantize_model

    q = quantize_model(_tiny_mixtral(torch.float16), "nf4")
    mod = next(m for m in q.modules() if isinstance(m._modules.get("gate_up_proj"), QuantizedExperts))
    g = _gen("module-graph")
    h = torch.randn(4, 256, device=DEV, generator=g).half()
    idx = torch.stack([torch.randperm(8, device=DEV, generator=g)[:2] for _ in range(4)])
    w = torch.softmax(torch.randn(4, 2, device=DEV, generator=g), -1).half()
    with torch.no_grad():
        qexperts.grouped_experts_forward(mod, h, idx, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = qexperts.grouped_experts_forward(mod, h, idx, w)
        idx.copy_(torch.stack([torch.randperm(8, device=DEV, generator=g)[:2] for _ in range(4)]))
        h.copy_(torch.randn(4, 256, device=DEV, generator=g).half())
        graph.replay()
        torch.cuda.synchronize()
        want = qexperts._eager_forward(mod)(mod, h, idx, w)
        assert rel_err(out, want) < 5e-3, f"seed {SEED}"
        assert torch.equal(out, qexperts.grouped_experts_forward(mod, h, idx, w))
