"""shardq::grouped_gemm_4bit and the grouped experts forward on the CPU: the reference op against per-expert
dequantize + linear over many shapes (empty experts, K not a multiple of the blocksize, odd element counts, nf4/fp4,
double quant, fp16/bf16/fp32, outliers, fresh seeds), its checks, fake kernel and opcheck; tiny Mixtral and
Qwen2-MoE models quantized by shardq giving the same logits through the grouped forward as through the eager loop
(the oracle); the dispatch (eager loop on the CPU, for int8 stacks and for gradients)."""

from __future__ import annotations

import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import shardq.kernels.ops  # noqa: E402,F401
from shardq.config import QuantConfig  # noqa: E402
from shardq.quant import experts as qexperts  # noqa: E402
from shardq.quant.convert import quantize_model  # noqa: E402
from shardq.quant.experts import QuantizedExperts  # noqa: E402
from _f_numerics import rel_err  # noqa: E402

SEED = int(time.time() * 1000) % 2**31  # fresh inputs every run; the seed is in every failure message
CONFIGS = {
    "nf4": QuantConfig(method="nf4"),
    "fp4-128": QuantConfig(method="fp4", blocksize=128),
    "nf4-dq": QuantConfig(method="nf4", double_quant=True),
    "fp4-dq-32": QuantConfig(method="fp4", blocksize=32, double_quant=True),
}
# (experts, out_features, in_features, rows per expert): empty experts, K not a multiple of the blocksize, an odd
# element count per expert (rows starting mid-byte), a single expert, eight experts
SHAPES = [
    (1, 24, 64, [5]),
    (3, 48, 40, [3, 0, 4]),
    (4, 7, 13, [0, 2, 0, 1]),
    (8, 64, 96, [2, 0, 1, 3, 0, 0, 5, 1]),
    (5, 33, 130, [0, 0, 0, 0, 6]),
    (2, 16, 1000, [1, 1]),
]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed((SEED + hash(key)) % 2**31)


def _stack(e: int, n: int, k: int, cfg: QuantConfig, g: torch.Generator) -> QuantizedExperts:
    w = torch.randn(e, n, k, generator=g)
    w[:, :, ::7] *= 10.0  # outlier weights
    return QuantizedExperts(e, n, k, cfg, device="meta", dtype=w.dtype).load_from_float(w)


def _nested(s: QuantizedExperts) -> tuple:
    return (s.nested_absmax, s.nested_quant_map, s.nested_offset) if s.double_quant else (None, None, None)


def _grouped(s: QuantizedExperts, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.ops.shardq.grouped_gemm_4bit(
        x, offsets, s.weight, s.absmax, s.quant_map, s.blocksize, s.out_features, *_nested(s)
    )


def _per_expert(s: QuantizedExperts, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The old path: each expert with rows dequantized whole (`stack[e]`), then F.linear."""
    parts, start = [], 0
    for e, r in enumerate(rows):
        parts.append(F.linear(x[start : start + r], s.expert(e, x.dtype)))
        start += r
    return torch.cat(parts)


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"E{s[0]}-N{s[1]}-K{s[2]}")
def test_reference_equals_per_expert_dequantize_and_linear(cfg, dtype, shape):
    e, n, k, rows = shape
    g = _gen(cfg, dtype, e, n, k)
    s = _stack(e, n, k, CONFIGS[cfg], g)
    x = torch.randn(sum(rows), k, generator=g)
    x[:, 3] *= 30.0  # an outlier column
    x = x.to(dtype)
    offsets = torch.tensor([0, *rows]).cumsum(0)
    for off in (offsets, offsets.int()):
        out = _grouped(s, x, off)
        assert out.dtype == dtype and out.shape == (sum(rows), n)
        torch.testing.assert_close(out, _per_expert(s, x, rows), rtol=0, atol=0, msg=lambda m: f"seed {SEED}: {m}")


def test_experts_without_rows_are_never_read():
    s = _stack(4, 16, 64, CONFIGS["nf4-dq"], _gen("unread"))
    s.weight[1].fill_(0xFF)
    s.absmax[3].fill_(0)
    s.nested_absmax[1].fill_(float("nan"))  # expert 1 and 3 hold garbage: they get no rows
    s.nested_offset[3] = float("nan")
    x = torch.randn(5, 64, generator=_gen("unread-x"))
    out = _grouped(s, x, torch.tensor([0, 2, 2, 5, 5]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _per_expert(s, x, [2, 0, 3, 0]), rtol=0, atol=0)


def test_no_rows_at_all():
    s = _stack(3, 16, 64, CONFIGS["nf4"], _gen("empty"))
    out = _grouped(s, torch.empty(0, 64, dtype=torch.float16), torch.zeros(4, dtype=torch.int64))
    assert out.shape == (0, 16) and out.dtype == torch.float16


@pytest.mark.parametrize(
    "offsets,match",
    [([0, 2, 1, 5], "offsets must rise"), ([0, 2, 4, 4], "offsets must rise"), ([1, 2, 3, 5], "offsets must rise"),
     ([0, 5], r"\[E \+ 1\]")],
)  # fmt: skip
def test_bad_offsets_are_refused(offsets, match):
    s = _stack(3, 16, 64, CONFIGS["nf4"], _gen("bad"))
    with pytest.raises(RuntimeError, match=match):
        _grouped(s, torch.randn(5, 64), torch.tensor(offsets))


def test_bad_shapes_are_refused():
    s = _stack(3, 16, 64, CONFIGS["nf4"], _gen("shapes"))
    off = torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="bytes per expert"):
        _grouped(s, torch.randn(3, 32), off)
    with pytest.raises(RuntimeError, match="code must be fp32"):
        torch.ops.shardq.grouped_gemm_4bit(torch.randn(3, 64), off, s.weight, s.absmax, s.quant_map[0], 64, 16,
                                           None, None, None)  # fmt: skip
    with pytest.raises(RuntimeError, match="offsets must be int32/int64"):
        _grouped(s, torch.randn(3, 64), off.float())


def test_fake_kernel_gives_the_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.shardq.grouped_gemm_4bit(
            torch.empty(9, 40, dtype=torch.bfloat16), torch.empty(4, dtype=torch.int32),
            torch.empty(3, 960, dtype=torch.uint8), torch.empty(3, 30), torch.empty(3, 16), 64, 48, None, None, None,
        )  # fmt: skip
        assert out.shape == (9, 48) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("cfg", ["nf4", "nf4-dq"])
def test_opcheck(cfg):
    s = _stack(3, 48, 40, CONFIGS[cfg], _gen("opcheck", cfg))
    x = torch.randn(6, 40, generator=_gen("opcheck-x")).half()
    args = (x, torch.tensor([0, 2, 2, 6]), s.weight, s.absmax, s.quant_map, s.blocksize, 48, *_nested(s))
    torch.library.opcheck(
        torch.ops.shardq.grouped_gemm_4bit.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


# ---- the experts forward: tiny models quantized by shardq, grouped forward vs the eager loop ----

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


def tiny(arch: str) -> transformers.PretrainedConfig:
    if arch == "mixtral":
        return transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **COMMON)
    return transformers.Qwen2MoeConfig(num_experts=6, num_experts_per_tok=4, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=64, **COMMON)  # fmt: skip


def experts_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m._modules.get("gate_up_proj"), QuantizedExperts)]


def with_implementation(model: nn.Module, name: str) -> nn.Module:
    for m in experts_modules(model):
        qexperts.set_implementation(m, name)
    return model


@pytest.fixture(scope="module")
def models():
    out = {}
    for arch in ("mixtral", "qwen2_moe"):
        torch.manual_seed(0)
        out[arch] = transformers.AutoModelForCausalLM.from_config(tiny(arch)).eval()
    return out


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("cfg", ["nf4", "fp4-128", "nf4-dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_forward_gives_the_eager_logits(models, arch, cfg, dtype):
    q = quantize_model(copy.deepcopy(models[arch]).to(dtype), CONFIGS[cfg])
    mods = experts_modules(q)
    assert len(mods) == 2 and all(m.config._experts_implementation == qexperts.IMPLEMENTATION for m in mods)
    ids = torch.randint(0, VOCAB, (3, 7), generator=_gen("ids", arch, cfg))
    want = _logits(with_implementation(q, "eager"), ids)
    calls = []
    real = qexperts.grouped_matmul
    try:
        qexperts.grouped_matmul = lambda *a: calls.append(1) or real(*a)
        got = _logits(with_implementation(q, qexperts.GROUPED), ids)
    finally:
        qexperts.grouped_matmul = real
    assert len(calls) == 2 * 2  # gate_up and down of both layers
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {SEED}: {m}")
    else:  # one index_add_ of bf16 rows sums a token's experts in fp32, the loop rounds after each: an ulp or two
        assert rel_err(got, want) < 4e-3, f"seed {SEED}"


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 2, 5, 40])
def test_grouped_forward_on_one_module_with_empty_experts(models, top_k, tokens):
    q = quantize_model(copy.deepcopy(models["mixtral"]).half(), "nf4")
    mod = experts_modules(q)[0]
    g = _gen("module", top_k, tokens)
    h = torch.randn(tokens, 64, generator=g).half()
    idx = torch.stack([torch.randperm(5, generator=g)[:top_k] for _ in range(tokens)])  # experts 5..7 never hit
    w = torch.softmax(torch.randn(tokens, top_k, generator=g), -1).half()
    got = qexperts.grouped_experts_forward(mod, h, idx, w)
    want = qexperts._eager_forward(mod)(mod, h, idx, w)
    if top_k <= 2:  # two fp16 additions to zero: the same in any order
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"seed {SEED}: {m}")
    else:  # one index_add_ sums a token's rows in fp32, the loop rounds to fp16 after each expert
        assert rel_err(got, want) < 2e-3, f"seed {SEED}"


def test_dispatch_runs_the_eager_loop_where_the_grouped_forward_does_not_apply(models, monkeypatch):
    def boom(*a):
        raise AssertionError("grouped path taken")

    q = quantize_model(copy.deepcopy(models["mixtral"]), "nf4")
    ids = torch.randint(0, VOCAB, (1, 5))
    monkeypatch.setattr(qexperts, "grouped_matmul", boom)
    _logits(q, ids)  # "shardq" on the CPU: the eager loop
    mod = experts_modules(q)[0]
    h = torch.randn(4, 64, requires_grad=True)
    assert not qexperts.grouped_supported(mod, h)  # a gradient is wanted: the op has no backward
    with torch.no_grad():
        assert qexperts.grouped_supported(mod, h)
    int8 = quantize_model(copy.deepcopy(models["mixtral"]), "int8")
    assert not qexperts.grouped_supported(experts_modules(int8)[0], h.detach())
    _logits(with_implementation(int8, qexperts.GROUPED), ids)  # int8 stacks: the eager loop even when asked


def test_deepcopy_keeps_the_implementation(models):
    q = quantize_model(copy.deepcopy(models["qwen2_moe"]), "nf4")
    ids = torch.randint(0, VOCAB, (2, 4))
    c = copy.deepcopy(with_implementation(q, qexperts.GROUPED))
    assert {m.config._experts_implementation for m in experts_modules(c)} == {qexperts.GROUPED}
    torch.testing.assert_close(_logits(c, ids), _logits(q, ids), rtol=0, atol=0)


def test_bench_smoke_writes_a_result_the_renderer_accepts(tmp_path, monkeypatch):
    """bench/bench_moe.py --smoke (CPU, tiny shapes, the reference op) runs every variant and writes moe.json in the
    results schema (to tmp_path only: no numbers of this machine land in bench/results/)."""
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    monkeypatch.delenv("OUT", raising=False)
    import bench_moe
    import render_results

    assert bench_moe.main(["--smoke", "--reps", "1", "--out", str(tmp_path)]) == 0
    (res,) = render_results.load_results(tmp_path)
    assert res["benchmark"] == "moe" and res["notes"][0].startswith("MoE experts layer")
    by_variant = {r[1]: r for r in res["rows"] if r[0] == 1}
    assert {"sq_nf4_grouped", "sq_nf4_old", "hf_bf16_eager"} <= set(by_variant)
    assert by_variant["sq_nf4_grouped"][2] is not None and by_variant["sq_nf4_grouped"][7] < 1e-2
