"""`python -m shardq demo`: the built-in end-to-end job on whatever machine this is.

Builds a small Llama from a transformers config (random weights), saves it as a sharded safetensors checkpoint,
prints the plan, loads it with `load_sharded` under memory caps and a quantization (GPUs when there are some,
else the CPU with disk offload), runs a forward and a greedy `generate()`, and compares both with the unsharded
fp32 model kept in memory. Everything is offline: no model hub, no downloads.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the functions that run the job, so `--help` answers without it
    import torch

PROMPT_LEN = 32
NEW_TOKENS = 8
CONTEXT = PROMPT_LEN + NEW_TOKENS  # the workload's seq_len: the KV cache holds the prompt and the new tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shardq demo", description=__doc__.splitlines()[0])
    p.add_argument("--quant", default="nf4", help="none, int8, nf4 or fp4 (default nf4)")
    p.add_argument(
        "--max-memory",
        default=None,
        help="caps like '0=600MB,cpu=8GB,disk=20GB' or a JSON object (default: a tight cap on the first "
        "GPU, or on the CPU without a GPU, so that part of the model is offloaded)",
    )
    p.add_argument("--out", default=None, help="folder for the checkpoint and the offload files (default: a temp dir)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (default 12: about 100 MB in fp32)")
    p.add_argument("--hidden", type=int, default=384, help="hidden size (default 384)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    return p


def make_config(layers: int, hidden: int, vocab: int) -> Any:
    from transformers import LlamaConfig

    heads = max(2, hidden // 64)
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def save_reference(out: Path, layers: int, hidden: int, vocab: int, seed: int) -> tuple[torch.nn.Module, Path]:
    """The fp32 reference model (random weights) and its sharded checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    ref = LlamaForCausalLM(make_config(layers, hidden, vocab)).eval()
    ckpt = out / "checkpoint"
    total = sum(p.numel() * p.element_size() for p in ref.parameters())
    ref.save_pretrained(ckpt, max_shard_size=max(total // 4, 2**20))
    return ref, ckpt


def default_caps(ckpt: Path, quant: str) -> dict[Any, Any]:
    """Tight enough that part of the model is offloaded: about half of what the plan needs on one device."""
    import torch

    from shardq.hf import meta_model_from_dir
    from shardq.planning.planner import plan_model

    model = meta_model_from_dir(ckpt)
    from shardq.planning.planner import PlanError

    key = 0 if torch.cuda.is_available() else "cpu"
    whole = plan_model(model, quant, max_memory={key: "1TB"}, workload=(1, CONTEXT))
    total, first = whole.totals[key], None
    for i in range(8, 32):  # from a quarter of the weights up: the first cap that plans with blocks offloaded
        cap = int(total * i / 32 + whole.reserves[key])
        caps = {0: cap, "cpu": "8GB", "disk": "20GB"} if key == 0 else {"cpu": cap, "disk": "20GB"}
        try:
            plan = plan_model(model, quant, max_memory=caps, workload=(1, CONTEXT))
        except PlanError:
            continue
        first = first or caps
        if len({p.device for p in plan.placements}) > 1:
            return caps
    return first or {key: "1TB"}


def _run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Logits, greedy tokens, forward seconds and seconds per generated token."""
    import torch

    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(ids).logits.float().cpu()
        forward_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens = model.generate(ids, **kw)[0, ids.shape[1] :].cpu()
    return logits, tokens, forward_s, (time.perf_counter() - t0) / NEW_TOKENS


def compare(model: torch.nn.Module, ref: torch.nn.Module, method: str, seed: int) -> dict[str, Any]:
    """The loaded model against the fp32 reference and against the same quantization applied in memory (which
    isolates what the loader adds: nothing, when it is right)."""
    import copy

    import torch

    from shardq.quant.convert import quantize_model

    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, ref.config.vocab_size, (1, PROMPT_LEN), generator=g)
    got, tokens, forward_s, token_s = _run(model, ids)
    want, ref_tokens, _, _ = _run(ref, ids)
    out = {
        "max_abs_diff": (got - want).abs().max().item(),
        "rel_err": ((got - want).norm() / want.norm()).item(),
        "top1_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "tokens_equal": int((tokens == ref_tokens).sum()),
        "tokens": tokens.tolist(),
        "ref_tokens": ref_tokens.tolist(),
        "forward_s": forward_s,
        "token_s": token_s,
    }
    if method != "none":
        qref = quantize_model(copy.deepcopy(ref), method)
        qwant, qtokens, _, _ = _run(qref, ids)
        out.update(q_max_abs_diff=(got - qwant).abs().max().item(), q_tokens_equal=int((tokens == qtokens).sum()))
    return out


def _peak_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def report(model: torch.nn.Module, result: dict[str, Any], load_s: float, quant: str) -> str:
    from shardq.memory import format_size
    from shardq.runtime.dispatch import format_memory_report, memory_report

    stats = model.shardq_load_stats
    lines = [
        "",
        f"loaded {stats.tensors} tensors ({format_size(stats.bytes_read)}) in {load_s:.2f} s; streaming them "
        f"(read, quantize, place or write to the offload folder) took {stats.seconds:.2f} s; "
        f"disk blocks written: {len(stats.disk_blocks)}",
        "memory per device after loading and the forwards:",
        format_memory_report(memory_report(model)),
        f"peak host RSS of this process: {format_size(_peak_rss())}",
        "",
        f"vs the unsharded fp32 model ({quant}): max |logit diff| {result['max_abs_diff']:.3g}, "
        f"relative error {result['rel_err']:.3g}, top-1 agreement {result['top1_agree']:.1%}; greedy generate(): "
        f"{result['tokens_equal']}/{NEW_TOKENS} tokens equal (shardq {result['tokens']}, fp32 {result['ref_tokens']})",
        f"forward of {PROMPT_LEN} tokens {result['forward_s'] * 1e3:.0f} ms, "
        f"{result['token_s'] * 1e3:.0f} ms per generated token",
    ]
    if "q_max_abs_diff" in result:
        lines[-2] += (
            "\n  (that is the quantization's own error: random weights give flat logits, so greedy tokens flip easily)"
        )
        lines.insert(
            -2,
            f"vs the same model quantized to {quant} in memory (what the loader adds): max |logit diff| "
            f"{result['q_max_abs_diff']:.3g}, greedy generate(): {result['q_tokens_equal']}/{NEW_TOKENS} "
            "tokens equal",
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from shardq.memory import format_size

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from shardq.cli import parse_caps
    from shardq.config import QuantConfig
    from shardq.hf import meta_model_from_dir
    from shardq.loading.loader import load_sharded
    from shardq.planning.planner import plan_model
    from shardq.planning.report import format_plan

    method = QuantConfig.from_any(args.quant).method
    with tempfile.TemporaryDirectory(prefix="shardq-demo-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        where = f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no GPU: CPU + disk offload"
        print(f"shardq demo on {where}; files in {out}")
        ref, ckpt = save_reference(out, args.layers, args.hidden, args.vocab, args.seed)
        n_files = len(list(ckpt.glob("*.safetensors")))
        print(
            f"saved a random {args.layers}-layer Llama ({format_size(sum(p.numel() * 4 for p in ref.parameters()))} "
            f"fp32) as {n_files} safetensors shards"
        )
        caps = parse_caps(args.max_memory) if args.max_memory else default_caps(ckpt, method)
        plan = plan_model(meta_model_from_dir(ckpt), method, max_memory=caps, workload=(1, CONTEXT))
        print(f"\nplan for max_memory={caps}, quant={method}:")
        print(format_plan(plan))
        t0 = time.perf_counter()
        model = load_sharded(
            meta_model_from_dir(ckpt),
            ckpt,
            max_memory=caps,
            quant=method,
            offload_dir=out / "offload",
            workload=(1, CONTEXT),
            progress=True,
        )
        load_s = time.perf_counter() - t0
        result = compare(model, ref, method, args.seed)
        print(report(model, result, load_s, method))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as exc:  # shardq's errors say what to change
        print(f"shardq demo: {exc}", file=sys.stderr)
        return 1
