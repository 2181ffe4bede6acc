"""dispatch_model on the CPU: real CPU ("cpu" and "stream" modes) and disk offload of transformers models.

Every check compares with the same model run without dispatch: fp32 offload must be bit-exact, `generate()`
token for token, tied weights must stay tied, and bad maps must fail before anything moves.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from shardq.runtime.dispatch import DispatchError, dispatch_model, format_memory_report, memory_report, move_to, \
    remove_dispatch  # noqa: E402
from shardq.runtime.offload import write_disk_offload  # noqa: E402

VOCAB = 211


def tiny(arch: str, tie: bool = True) -> nn.Module:
    """A tiny fp32 `arch` model with random weights (seeded), in eval mode."""
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie)
    elif arch == "opt":
        cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                     vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=128,
                                     tie_word_embeddings=tie)
    elif arch == "bloom":
        cfg = transformers.BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=VOCAB, tie_word_embeddings=tie)
    elif arch == "t5":
        cfg = transformers.T5Config(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
                                    vocab_size=VOCAB, tie_word_embeddings=tie, decoder_start_token_id=0)
    else:
        raise ValueError(arch)
    cls = {"llama": transformers.LlamaForCausalLM, "opt": transformers.OPTForCausalLM,
           "bloom": transformers.BloomForCausalLM, "t5": transformers.T5ForConditionalGeneration}[arch]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and biases too
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def blocks(model: nn.Module) -> list[str]:
    """Block names: each element of a ModuleList, and every other top-level module that holds tensors."""
    out, seen = [], set()

    def walk(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            full = f"{prefix}{name}"
            empty = not any(True for _ in child.parameters()) and not any(True for _ in child.buffers())
            if id(child) in seen or empty:
                continue
            seen.add(id(child))
            if isinstance(child, nn.ModuleList):
                out.extend(f"{full}.{i}" for i in range(len(child)))
                seen.update(id(c) for c in child)
            elif any(isinstance(c, nn.ModuleList) for c in child.modules()):
                assert not list(child.named_parameters(recurse=False)), full
                walk(full + ".", child)
            else:
                out.append(full)

    walk("", model)
    return out


def mixed_map(model: nn.Module) -> tuple[dict, dict]:
    """Every block offloaded, cycling through the three offload kinds: cpu compute, stream, disk."""
    dmap, modes = {}, {}
    for i, name in enumerate(blocks(model)):
        kind = ("cpu", "stream", "disk")[i % 3]
        dmap[name] = "disk" if kind == "disk" else "cpu"
        if kind != "disk":
            modes[name] = kind
    return dmap, modes


def clone(model: nn.Module) -> nn.Module:
    other = type(model)(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def inputs(arch: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    kw = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return kw


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "t5"])
def test_offloaded_forward_and_generate_match(arch, tmp_path):
    ref = tiny(arch)
    model = clone(ref)
    dmap, modes = mixed_map(model)
    dispatch_model(model, dmap, offload_modes=modes, offload_dir=tmp_path)
    assert set(model.shardq_offload_modes.values()) == {"cpu", "stream", "disk"}
    kw = inputs(arch)
    with torch.no_grad():
        want, got = ref(**kw), model(**kw)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    kw.pop("decoder_input_ids", None)
    assert torch.equal(model.generate(**kw, **gen), ref.generate(**kw, **gen))
    stats = model.shardq_runtime.streamer.stats
    assert stats["copies"] > 0 and stats["disk_reads"] > 0 and stats["prefetched"] > 0


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_tied_weights_stay_tied(arch, tmp_path):
    model = tiny(arch, tie=True)
    emb = model.get_input_embeddings()
    assert model.get_output_embeddings().weight is emb.weight
    dmap, modes = mixed_map(model)
    dispatch_model(model, dmap, offload_modes=modes, offload_dir=tmp_path)
    with torch.no_grad():
        model(**inputs(arch))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.device.type == "cpu"
    streamed = [b for b in model.shardq_runtime.blocks.values() if b.mode in ("stream", "disk")]
    assert all(not b.borrowed for b in streamed)  # tied tensors are packed with the block: no per-forward copies


def test_tied_weights_all_streamed_are_packed_per_block():
    ref = tiny("llama", tie=True)
    model = clone(ref)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="stream")
    rt = model.shardq_runtime
    assert not rt.blocks["lm_head"].borrowed and not rt.blocks["model.embed_tokens"].borrowed
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs("llama")).logits, ref(**inputs("llama")).logits, rtol=0, atol=0)


def test_untied_model_and_stream_without_prefetch(tmp_path):
    ref = tiny("llama", tie=False)
    model = clone(ref)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="stream", prefetch=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs("llama")).logits, ref(**inputs("llama")).logits, rtol=0, atol=0)
    assert model.shardq_runtime.streamer.stats["prefetched"] == 0


def test_kv_cache_across_offloaded_layers():
    ref = tiny("llama")
    model = clone(ref)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="stream")
    kw = inputs("llama")
    with torch.no_grad():
        a, b = ref(**kw, use_cache=True), model(**kw, use_cache=True)
        nxt = torch.randint(3, VOCAB, (2, 1))
        mask = torch.cat([kw["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
        a2 = ref(input_ids=nxt, attention_mask=mask, past_key_values=a.past_key_values)
        b2 = model(input_ids=nxt, attention_mask=mask, past_key_values=b.past_key_values)
    torch.testing.assert_close(b2.logits, a2.logits, rtol=0, atol=0)


def test_cpu_mode_computes_in_fp32_and_returns_input_dtype():
    ref = tiny("llama").to(torch.bfloat16)
    model = clone(ref).to(torch.bfloat16)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="cpu")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        got = model(**inputs("llama")).logits
        want = clone(tiny("llama")).to(torch.float32)(**inputs("llama")).logits
    assert got.dtype == torch.bfloat16
    # fp32 compute from bf16-rounded weights: close to the fp32 model, far closer than bf16 rounding of logits
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 2e-2


def test_disk_blocks_written_by_loader_into_meta_model(tmp_path):
    ref = tiny("opt")
    with torch.device("meta"):
        model = type(ref)(ref.config).eval()
    names = blocks(model)
    sd = ref.state_dict()
    dmap = {}
    for i, name in enumerate(names):
        if i % 2:
            own = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            write_disk_offload(tmp_path, name, own)
            dmap[name] = "disk"
        else:
            dmap[name] = "cpu"
    for name, mod in model.named_modules():  # the non-disk blocks are loaded the ordinary way
        if dmap.get(name) == "cpu":
            mod.to_empty(device="cpu")
            mod.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
    model.tie_weights()
    dispatch_model(model, dmap, offload_modes="stream", offload_dir=tmp_path)
    assert model.model.decoder.layers[0].fc1.weight.device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs("opt")).logits, ref(**inputs("opt")).logits, rtol=0, atol=0)


def test_quantized_blocks_stream_packed(tmp_path):
    from shardq.config import QuantConfig
    from shardq.quant.linear import Linear4bit, Linear8bit
    from shardq.quant.convert import quantize_model

    for cfg in (QuantConfig(method="nf4", double_quant=True, compute_dtype=torch.float32),
                QuantConfig(method="int8", threshold=6.0)):
        ref = quantize_model(tiny("llama", tie=False), cfg, skip=["lm_head"])
        model = quantize_model(tiny("llama", tie=False), cfg, skip=["lm_head"])
        kinds = {Linear4bit, Linear8bit}
        assert any(type(m) in kinds for m in model.modules())
        dmap, modes = mixed_map(model)
        dispatch_model(model, dmap, offload_modes=modes, offload_dir=tmp_path / cfg.method)
        layer = model.model.layers[0]  # a streamed block: its packed uint8/int8 buffers are what gets copied
        assert model.shardq_offload_modes["model.layers.0"] == "stream"
        assert layer.mlp.up_proj.weight.dtype in (torch.uint8, torch.int8)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs("llama")).logits, ref(**inputs("llama")).logits, rtol=0, atol=0)


def test_memory_report_and_readable_state(tmp_path):
    model = tiny("llama", tie=False)
    dmap, modes = mixed_map(model)
    dispatch_model(model, dmap, offload_modes=modes, offload_dir=tmp_path)
    assert model.shardq_device_map == dmap
    rep = memory_report(model)
    assert set(rep) == {"cpu", "disk"}
    disk_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert 0 < rep["disk"]["placed"] <= disk_bytes
    total = sum(p.numel() * p.element_size() for p in tiny("llama", tie=False).parameters())
    assert rep["cpu"]["placed"] + rep["disk"]["placed"] >= total
    assert rep["cpu"]["stream_slots"] >= 2 * max(b.nbytes for b in model.shardq_runtime.streamer.blocks.values())
    disk_blocks = [b for b in model.shardq_runtime.streamer.blocks.values() if not hasattr(b, "buffer")]
    assert rep["cpu"]["staging"] == 2 * max(b.nbytes for b in disk_blocks)
    table = format_memory_report(rep)
    assert "disk" in table and "stream_slots" in table


def test_remove_dispatch_restores_forwards():
    model = tiny("llama", tie=False).half()  # "cpu" blocks of a 16-bit model compute in fp32: wrapped
    dispatch_model(model, {"": "cpu", "model.layers.1": "cpu"}, offload_modes="cpu")
    assert "forward" in model.__dict__ and "forward" in model.model.layers[1].__dict__
    import inspect
    assert "input_ids" in inspect.signature(model.forward).parameters  # generate() inspects it
    remove_dispatch(model)
    assert not hasattr(model, "shardq_runtime")
    assert "forward" not in model.__dict__ and "forward" not in model.model.layers[1].__dict__


def test_fp32_model_on_the_cpu_gets_no_block_wrappers():
    """Nothing moves and nothing is cast: the blocks run as the undispatched model's (no cost when nothing moves)."""
    model = tiny("llama", tie=False)
    ids = torch.randint(1, 100, (2, 5))
    want = model(ids).logits
    dmap = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu",
            "model.rotary_emb": "cpu"}
    dispatch_model(model, dmap, offload_modes="cpu")
    assert not any("forward" in m.__dict__ for m in model.model.modules())
    assert torch.equal(model(ids).logits, want)
    half = tiny("llama", tie=False).half()  # fp16 weights: "cpu" blocks compute in fp32, so they are wrapped
    dispatch_model(half, dmap, offload_modes="cpu")
    assert "forward" in half.model.layers.__dict__ and "forward" in half.lm_head.__dict__


# ---- move_to


@dataclasses.dataclass
class _Pair:
    a: torch.Tensor
    b: object


def test_move_to_nested_structures_casts_floats_only():
    Point = namedtuple("Point", "x y")
    cache = transformers.DynamicCache()
    out = transformers.modeling_outputs.CausalLMOutputWithPast(logits=torch.randn(2, 3), past_key_values=cache)
    obj = {"t": (torch.randn(2), [torch.arange(3)]), "p": Point(torch.randn(1), 5), "d": _Pair(torch.randn(2), "s"),
           "o": out, "od": OrderedDict(z=torch.randn(1))}
    moved = move_to(obj, torch.device("cpu"), torch.float64)
    assert moved["t"][0].dtype == torch.float64 and moved["t"][1][0].dtype == torch.int64
    assert isinstance(moved["p"], Point) and moved["p"].y == 5 and moved["p"].x.dtype == torch.float64
    assert isinstance(moved["d"], _Pair) and moved["d"].b == "s"
    assert type(moved["o"]) is type(out) and moved["o"].logits.dtype == torch.float64
    assert moved["o"].past_key_values is cache  # caches are never copied
    assert isinstance(moved["od"], OrderedDict)
    same = torch.randn(3)
    assert move_to(same, torch.device("cpu")) is same


# ---- bad input: clear errors, nothing moved


def _snapshot(model: nn.Module) -> dict:
    return {k: (v.device, v.dtype, v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("dmap, modes, match", [
    ({"model.layer.0": "cpu"}, None, "did you mean 'model.layers.0'"),
    ({"model.layers.0": "cpu"}, None, "not covered by the device map"),
    ({"": "tpu"}, None, "not understood"),
    ({"": 7}, None, "does not exist"),
    ({"": "disk"}, None, "no offload_dir"),
    ({"": "cpu"}, {"": "fast"}, "runs as 'cpu'"),
    ({"": "cpu", "model.layers.0": "disk"}, {"model.layers.0": "cpu"}, "not 'cpu' entries"),
    ({"": "cpu", "model.layers.0": "cpu"}, {"": "stream"}, "contains other device-map entries"),
    ({}, None, "non-empty dict"),
])
def test_bad_maps_raise_before_moving(dmap, modes, match):
    model = tiny("llama", tie=False)
    before = _snapshot(model)
    with pytest.raises(DispatchError, match=match):
        dispatch_model(model, dmap, offload_modes=modes)
    assert _snapshot(model) == before
    assert "forward" not in model.__dict__ and not hasattr(model, "shardq_runtime")


def test_meta_tensors_and_mismatched_disk_files_are_rejected(tmp_path):
    with torch.device("meta"):
        meta = tiny("llama", tie=False)
    with pytest.raises(DispatchError, match="meta device"):
        dispatch_model(meta, {"": "cpu"})
    model = tiny("llama", tie=False)
    write_disk_offload(tmp_path, "model.layers.0", {"mlp.up_proj.weight": torch.randn(5, 5)})
    with pytest.raises(DispatchError, match="does not match the module"):
        dispatch_model(model, {"": "cpu", "model.layers.0": "disk"}, offload_modes="cpu", offload_dir=tmp_path)
    dispatch_model(model, {"": "cpu"}, offload_modes="cpu")
    with pytest.raises(DispatchError, match="already dispatched"):
        dispatch_model(model, {"": "cpu"})


def test_error_inside_a_block_restores_its_weights(tmp_path):
    model = tiny("llama", tie=False)
    dispatch_model(model, {n: "cpu" for n in blocks(model)}, offload_modes="stream")
    layer = model.model.layers[0]
    host = layer.mlp.up_proj.weight
    with pytest.raises(RuntimeError):  # wrong hidden size: fails inside the block, after its weights were swapped in
        layer(torch.randn(2, 3, 5), position_embeddings=(torch.randn(2, 3, 16), torch.randn(2, 3, 16)))
    assert layer.mlp.up_proj.weight is host
    assert not any(s.busy for s in model.shardq_runtime.streamer.slots)
    with torch.no_grad():  # and the model still runs
        model(**inputs("llama"))


def test_nested_entries_inside_a_resident_block(tmp_path):
    ref = tiny("bloom")
    model = clone(ref)
    dmap = {"": "cpu", "transformer.h.1": "cpu", "transformer.h.2": "disk"}
    dispatch_model(model, dmap, offload_modes={"": "cpu", "transformer.h.1": "stream"}, offload_dir=tmp_path)
    assert model.shardq_runtime.blocks["transformer.h.1"].out_device == torch.device("cpu")
    kw = inputs("bloom")
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, ref(**kw).logits, rtol=0, atol=0)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw, **gen), ref.generate(**kw, **gen))


def test_cpu_rotary_block_returns_the_hidden_dtype():
    """A "cpu" block with an fp32 buffer (rotary inv_freq) in a bf16 model must hand bf16 cos/sin to the
    streamed bf16 layers (fp32 ones would break their attention)."""
    ref = tiny("llama", tie=False).to(torch.bfloat16)
    model = clone(ref).to(torch.bfloat16)
    for m in (ref, model):  # as transformers keeps it when it builds a half-precision model
        m.model.rotary_emb.inv_freq = m.model.rotary_emb.inv_freq.float()
    modes = {n: ("cpu" if n in ("model.rotary_emb", "model.norm") else "stream") for n in blocks(model)}
    dispatch_model(model, {n: "cpu" for n in modes}, offload_modes=modes)
    with torch.no_grad():
        got, want = model(**inputs("llama")).logits, ref(**inputs("llama")).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_offload_modes_by_parent_name_longest_wins():
    """A parent name forces every "cpu" block under it; a longer name overrides it, as in the planner."""
    model = tiny("llama", tie=False)
    names = blocks(model)
    layers = [n for n in names if n.startswith("model.layers.")]
    dispatch_model(model, {n: "cpu" for n in names}, offload_modes={"model.layers": "stream", layers[0]: "cpu"})
    modes = model.shardq_offload_modes
    assert modes[layers[0]] == "cpu" and modes[layers[0]].reason == f"forced by offload_modes[{layers[0]!r}]"
    assert all(modes[n] == "stream" and modes[n].reason == "forced by offload_modes['model.layers']"
               for n in layers[1:])
    with torch.no_grad():
        model(**inputs("llama"))


def test_offload_modes_name_covering_no_cpu_block_is_refused():
    model = tiny("llama", tie=False)
    before = _snapshot(model)
    dmap = {n: ("disk" if n.startswith("model.layers") else "cpu") for n in blocks(model)}
    with pytest.raises(DispatchError, match="nor parents of one"):
        dispatch_model(model, dmap, offload_modes={"model.layers": "stream"})
    assert _snapshot(model) == before
