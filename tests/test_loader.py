"""load_sharded on the CPU: sharded and single checkpoints into meta-built models, CPU and disk offload,
outputs against the unsharded fp32 model, generate() token for token, and bad checkpoints and maps."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from _f_models import rewrite_checkpoint, save_sharded_models  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from shardq.checkpoint.index import CheckpointError  # noqa: E402
from shardq.hf import meta_model_from_dir  # noqa: E402
from shardq.loading.loader import LoadError  # noqa: E402
from shardq.loading.loader import load_sharded  # noqa: E402
from shardq.loading.loader import load_sharded_from_dir  # noqa: E402
from shardq.planning.planner import PlanError  # noqa: E402
from shardq.quant.linear import Linear4bit  # noqa: E402
from shardq.quant.linear import Linear8bit  # noqa: E402

VOCAB = 128


def tiny(arch: str, tie: bool = False):
    """A small config of a real architecture (random weights once built)."""
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                                        tie_word_embeddings=tie)
    if arch == "opt":
        return transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                      vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=128)
    if arch == "bloom":
        return transformers.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=VOCAB)
    if arch == "t5":
        return transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                                     vocab_size=VOCAB, decoder_start_token_id=0)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    raise ValueError(arch)


def build(arch: str, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny(arch, tie)
    model = transformers.AutoModelForSeq2SeqLM.from_config(cfg) if arch == "t5" else \
        transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # outliers, as real checkpoints have them
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "shared" not in name:
                p[:, :2] *= 8
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (reference model, sharded checkpoint dir)."""
    return save_sharded_models(tmp_path_factory, ("llama", "opt", "bloom", "t5", "gpt2"), build)


def inputs(arch: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    kw = {"decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=g)} if arch == "t5" else {}
    return ids, kw


def logits(model, arch):
    ids, kw = inputs(arch)
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def offload_map(model: torch.nn.Module) -> dict:
    """Every other decoder block on disk, the rest on the CPU."""
    from shardq.planning.planner import decompose
    from shardq.hf import no_split_modules

    units = decompose(model, set(no_split_modules(model)))
    return {u: ("disk" if i % 2 else "cpu") for i, u in enumerate(units)}


def all_meta(model) -> bool:
    return all(t.device.type == "meta" for t in model.state_dict().values())


# ---------------------------------------------------------------------------------------------------------------
# outputs vs the unsharded model


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "t5", "gpt2"])
def test_fp32_cpu_and_disk_offload_matches_reference(saved, arch, tmp_path):
    ref, ckpt = saved[arch]
    model = meta_model_from_dir(ckpt)
    assert all_meta(model)
    dm = offload_map(model)
    model = load_sharded(model, ckpt, max_memory={"cpu": "1GB", "disk": "1GB"}, device_map=dm,
                         offload_dir=tmp_path / "off", progress=False)
    assert model.shardq_offload_modes and "disk" in model.shardq_offload_modes.values()
    assert any(f.suffix == ".safetensors" for f in (tmp_path / "off").iterdir())
    torch.testing.assert_close(logits(model, arch), logits(ref, arch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "t5"])
def test_generate_token_for_token_fp32(saved, arch, tmp_path):
    ref, ckpt = saved[arch]
    model = load_sharded_from_dir(ckpt, max_memory={"cpu": "1GB", "disk": "1GB"},
                                  device_map=offload_map(meta_model_from_dir(ckpt)), offload_dir=tmp_path, progress=False)
    ids, _ = inputs(arch)
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    torch.testing.assert_close(model.generate(ids, **kw), ref.generate(ids, **kw), rtol=0, atol=0)


def rel_error(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out - want).norm() / want.norm()).item()


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "t5", "gpt2"])
@pytest.mark.parametrize("method,bound", [("int8", 0.08), ("nf4", 0.3)])
def test_quantized_offload_within_tolerance(saved, arch, method, bound, tmp_path):
    ref, ckpt = saved[arch]
    model = meta_model_from_dir(ckpt)
    model = load_sharded(model, ckpt, quant=method, max_memory={"cpu": "1GB", "disk": "1GB"},
                         device_map=offload_map(model), offload_dir=tmp_path, progress=False)
    kinds = {type(m) for m in model.modules()}
    assert (Linear8bit if method == "int8" else Linear4bit) in kinds
    assert {p.quant for p in model.shardq_plan.placements} & {method}
    out, want = logits(model, arch), logits(ref, arch)
    rel = rel_error(out, want)
    # the same quantization applied to the reference in memory gives the same error: the loader adds none
    from shardq.quant.convert import quantize_model
    import copy
    qref = quantize_model(copy.deepcopy(ref), method)
    torch.testing.assert_close(out, logits(qref, arch), rtol=1e-4, atol=1e-4)
    # random T5 (unscaled attention logits) amplifies 4-bit weight error: the bound vs fp32 is looser there
    assert 0 < rel < (bound * 8 if arch == "t5" else bound)


def test_quantized_layers_match_reference_quantization_bit_for_bit(saved, tmp_path):
    ref, ckpt = saved["llama"]
    model = load_sharded_from_dir(ckpt, quant="nf4", max_memory={"cpu": "1GB"}, progress=False)
    q = model.get_submodule("model.layers.1.mlp.down_proj")
    want = Linear4bit.from_linear(ref.model.layers[1].mlp.down_proj, q_cfg := model.shardq_plan.quant)
    assert q_cfg.method == "nf4"
    assert torch.equal(q.weight, want.weight) and torch.equal(q.absmax, want.absmax)
    assert isinstance(model.get_submodule("lm_head"), torch.nn.Linear)  # skipped by default, as bitsandbytes


def test_single_file_checkpoint_and_tied_weights(tmp_path):
    ref = build("llama", tie=True)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model = meta_model_from_dir(tmp_path)
    model = load_sharded(model, tmp_path / "model.safetensors", max_memory={"cpu": "1GB"}, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(logits(model, "llama"), logits(ref, "llama"), rtol=1e-5, atol=1e-5)


def test_real_weights_model_without_checkpoint(tmp_path):
    ref = build("opt")
    model = build("opt")
    model = load_sharded(model, max_memory={"cpu": "1GB", "disk": "1GB"}, device_map=offload_map(model),
                         offload_dir=tmp_path, progress=False)
    torch.testing.assert_close(logits(model, "opt"), logits(ref, "opt"), rtol=1e-5, atol=1e-5)


def test_base_model_from_head_checkpoint_strips_prefix(saved):
    ref, ckpt = saved["llama"]
    with torch.device("meta"):
        base = transformers.LlamaModel(tiny("llama"))
    with pytest.warns(UserWarning, match="lm_head.weight"):
        base = load_sharded(base, ckpt, max_memory={"cpu": "1GB"}, progress=False)
    ids, _ = inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, ref.model(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_dtype_and_plan_and_stats(saved):
    ckpt = saved["bloom"][1]
    model = load_sharded_from_dir(ckpt, dtype=torch.bfloat16, quant="none", max_memory={"cpu": "1GB", "disk": "1GB"},
                                  device_map={"": "disk"}, offload_dir=ckpt.parent / "bf16off", progress=False)
    assert model.shardq_plan.dtype == "bfloat16"
    stats = model.shardq_load_stats
    assert stats.tensors == len(load_file(str(next(ckpt.glob("*.safetensors"))))) or stats.tensors > 10
    assert "transformer.h.2" in stats.disk_blocks  # the tied embedding/head stay in memory, shared
    assert set(model.shardq_offload_modes.values()) == {"disk"}
    ref = saved["bloom"][0]
    assert rel_error(logits(model, "bloom").float(), logits(ref, "bloom")) < 0.02  # weights rounded to bf16


# ---------------------------------------------------------------------------------------------------------------
# bad checkpoints and maps: one clear error, nothing placed


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "dtype"])
def test_bad_checkpoint_lists_problems_and_leaves_model_untouched(saved, tmp_path, problem):
    _, ckpt = saved["llama"]

    def edit(t):
        if problem == "missing":
            del t["model.layers.1.mlp.up_proj.weight"]
        elif problem == "extra":
            t["model.layers.9.mlp.gate.weight"] = torch.randn(4, 4)
        elif problem == "shape":
            t["model.norm.weight"] = torch.randn(65)
        else:  # int8 codes of a quantized checkpoint whose config.json lost its quantization_config
            t["model.layers.0.mlp.up_proj.weight"] = torch.randint(-127, 127, (160, 64), dtype=torch.int8)

    bad = rewrite_checkpoint(ckpt, tmp_path / "bad", edit)
    model = meta_model_from_dir(bad)
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(LoadError) as e:
        load_sharded(model, bad, quant="nf4", max_memory={"cpu": "1GB"}, progress=False)
    msg = str(e.value)
    key = {"missing": "model.layers.1.mlp.up_proj.weight", "extra": "model.layers.9.mlp.gate.weight",
           "shape": "model.norm.weight: checkpoint [65], model [64]",
           "dtype": "model.layers.0.mlp.up_proj.weight: checkpoint int8, model float32"}[problem]
    assert key in msg and "Nothing was loaded" in msg
    assert all_meta(model) and [type(m) for m in model.modules()] == modules_before
    assert not hasattr(model, "shardq_runtime")


def test_truncated_shard_fails_before_anything(saved, tmp_path):
    import shutil

    _, ckpt = saved["opt"]
    bad = tmp_path / "trunc"
    shutil.copytree(ckpt, bad)
    shard = sorted(bad.glob("*.safetensors"))[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    model = meta_model_from_dir(bad)
    with pytest.raises(CheckpointError, match="truncated"):
        load_sharded(model, bad, max_memory={"cpu": "1GB"}, progress=False)
    assert all_meta(model)


def test_failure_while_streaming_rolls_back(saved, tmp_path, monkeypatch):
    import shardq.checkpoint.source as source

    _, ckpt = saved["llama"]
    model = meta_model_from_dir(ckpt)
    before = [type(m) for m in model.modules()]
    calls = {"n": 0}
    real = source.read_tensor

    def flaky(info, device=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk went away")
        return real(info, device)

    monkeypatch.setattr(source, "read_tensor", flaky)
    with pytest.raises(OSError, match="disk went away"):
        load_sharded(model, ckpt, quant="int8", max_memory={"cpu": "1GB", "disk": "1GB"},
                     device_map=offload_map(model), offload_dir=tmp_path, progress=False)
    assert all_meta(model) and [type(m) for m in model.modules()] == before
    monkeypatch.setattr(source, "read_tensor", real)
    load_sharded(model, ckpt, quant="int8", max_memory={"cpu": "1GB"}, progress=False)  # the same model loads after


@pytest.mark.parametrize("device_map,err", [
    ({"model.nope": "cpu", "": "cpu"}, PlanError),
    ({"model.embed_tokens": "cpu"}, PlanError),
    ({"model": "cpu", "model.layers.0": "cpu", "lm_head": "cpu"}, PlanError),
    ({"model": "cpu", "lm_head": "gpu7"}, PlanError),
    ({"model": "disk", "lm_head": "cpu"}, LoadError),
    ("diagonal", PlanError),
])
def test_bad_maps(saved, device_map, err):
    _, ckpt = saved["llama"]
    model = meta_model_from_dir(ckpt)
    with pytest.raises(err):
        load_sharded(model, ckpt, max_memory={"cpu": "1GB", "disk": "1GB"}, device_map=device_map, progress=False)
    assert all_meta(model)


def test_plan_that_cannot_fit(saved):
    _, ckpt = saved["llama"]
    model = meta_model_from_dir(ckpt)
    with pytest.raises(PlanError, match="does not fit"):
        load_sharded(model, ckpt, max_memory={"cpu": "20KB"}, progress=False)
    assert all_meta(model)


def test_meta_buffers_without_transformers_init_are_an_error(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("scale", torch.ones(4), persistent=False)

        def forward(self, x):
            return self.lin(x) * self.scale

    save_file({"lin.weight": torch.randn(4, 4), "lin.bias": torch.randn(4)}, str(tmp_path / "w.safetensors"))
    with torch.device("meta"):
        net = Net()
    with pytest.raises(LoadError, match="scale"):
        load_sharded(net, tmp_path / "w.safetensors", max_memory={"cpu": "1GB"}, progress=False)
    real = Net()  # buffers real, weights from the file: loads
    real.lin.to("meta")
    out = load_sharded(real, tmp_path / "w.safetensors", max_memory={"cpu": "1GB"}, progress=False)
    x = torch.randn(2, 4)
    w = load_file(str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(out(x), (x @ w["lin.weight"].T + w["lin.bias"]))


def test_already_loaded_model_is_refused(saved):
    _, ckpt = saved["bloom"]
    model = load_sharded_from_dir(ckpt, max_memory={"cpu": "1GB"}, progress=False)
    with pytest.raises(LoadError, match="already loaded"):
        load_sharded(model, ckpt, max_memory={"cpu": "1GB"}, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# pre-quantized checkpoints (saved by transformers + bitsandbytes 0.50.2; committed fixtures)

FIX = __import__("pathlib").Path(__file__).parent / "fixtures" / "bnb"


@pytest.mark.parametrize("name", ["tiny_llama_nf4_dq", "tiny_opt_fp4", "tiny_opt_int8"])
def test_prequantized_bitsandbytes_checkpoint_loads_without_requantizing(name, tmp_path):
    io = load_file(str(FIX / "tiny_io.safetensors"))
    model = meta_model_from_dir(FIX / name)
    dm = offload_map(model)
    model = load_sharded(model, FIX / name, max_memory={"cpu": "1GB", "disk": "1GB"}, device_map=dm,
                         offload_dir=tmp_path, progress=False)
    kinds = {type(m) for m in model.modules()}
    assert (Linear8bit if "int8" in name else Linear4bit) in kinds
    assert model.shardq_plan.quant.method == ("int8" if "int8" in name else name.split("_")[2])
    with torch.no_grad():
        out = model(io["input_ids"]).logits.float()
    want = io[f"logits_{name}"]
    # 4-bit: bitsandbytes' own dequantized weights, fp32 matmuls; int8: bitsandbytes' CPU path rounds in fp16
    assert rel_error(out, want) < (1e-2 if "int8" in name else 1e-5)


def test_prequantized_checkpoint_refuses_another_method():
    model = meta_model_from_dir(FIX / "tiny_opt_int8")
    with pytest.raises(LoadError, match="already quantized with 'int8'"):
        load_sharded(model, FIX / "tiny_opt_int8", quant="nf4", max_memory={"cpu": "1GB"}, progress=False)
    assert all_meta(model)


def test_head_model_from_base_checkpoint_adds_prefix(tmp_path):
    torch.manual_seed(0)
    base = transformers.LlamaModel(tiny("llama", tie=True)).eval()
    base.save_pretrained(tmp_path)
    with torch.device("meta"):
        lm = transformers.LlamaForCausalLM(tiny("llama", tie=True))
    lm = load_sharded(lm, tmp_path, max_memory={"cpu": "1GB"}, progress=False)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    ids, _ = inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).last_hidden_state, base(ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_bitsandbytes_config_accepted_as_is(saved, tmp_path):
    ref, ckpt = saved["opt"]
    fp32_offload = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    model = load_sharded_from_dir(ckpt, quant=fp32_offload, max_memory={"cpu": "1GB"}, progress=False)
    assert {p.quant for p in model.shardq_plan.placements} == {"fp32"}  # CPU blocks stay fp32, as bitsandbytes
    torch.testing.assert_close(logits(model, "opt"), logits(ref, "opt"), rtol=1e-5, atol=1e-5)
    fp4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)
    model = load_sharded_from_dir(ckpt, quant=fp4, max_memory={"cpu": "1GB"}, progress=False)
    q = model.get_submodule("model.decoder.layers.0.fc1")
    assert isinstance(q, Linear4bit) and q.quant_type == "fp4" and q.double_quant
    assert rel_error(logits(model, "opt"), logits(ref, "opt")) < 0.5


def test_progress_bar_counts_bytes(saved, capsys):
    _, ckpt = saved["bloom"]
    load_sharded_from_dir(ckpt, max_memory={"cpu": "1GB"}, progress="always")
    err = capsys.readouterr().err
    assert "Loading" in err and "100%" in err
    load_sharded_from_dir(ckpt, max_memory={"cpu": "1GB"}, progress=True)  # small load: no bar
    assert "Loading" not in capsys.readouterr().err
