"""Dispatch overhead per token: the same model with shardq's hooks vs plain, in one run.

The model (8-layer Llama-style fp16, 3.76 GB, as bench_offload.py) is split by a device map into per-block
entries. With two or more GPUs the first half of the layers goes to GPU 0 and the rest to GPU 1 (activations
cross GPUs); with one GPU every entry is on GPU 0, so what is measured is the hooks' own cost (moving
arguments, bookkeeping), not the inter-GPU copy: the table says which. Per-token latency is taken from greedy
`generate()` of 32 new tokens with the KV cache (the normal decoding path), and from a 1-token forward.

    python bench/bench_dispatch.py           # writes $OUT/bench_dispatch.json and prints a table
    python bench/bench_dispatch.py --small   # a tiny model: a smoke test of this script (runs without a GPU)
    python bench/bench_dispatch.py --cpu-micro   # per-block host cost of the wrappers (no GPU needed)
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_offload import DEV, bench_ms, block_map, build_model, forward  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
NEW_TOKENS = 32


def generate_ms_per_token(model, ids) -> float:
    """Wall time per new token of one greedy generation of NEW_TOKENS tokens."""
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        _sync()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        _sync()
    return (time.perf_counter() - t0) * 1e3 / NEW_TOKENS


def interleaved(plain, hooked, ids, rounds: int = 7) -> dict:
    """Medians of alternating plain/dispatched measurements, so clock drift hits both alike."""
    one = ids[:, :1]
    runs = {"generate_ms_per_token": lambda m: generate_ms_per_token(m, ids),
            "forward_1tok_ms": lambda m: bench_ms(lambda: forward(m, one), reps=20, warm=3)}
    out = {}
    for key, fn in runs.items():
        fn(plain), fn(hooked)  # warm-up
        a, b = [], []
        for _ in range(rounds):
            a.append(fn(plain))
            b.append(fn(hooked))
        out[key] = (statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in zip(a, b)) - 1)
    return out


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def split_map(model, ngpu: int) -> dict:
    dmap = block_map(model, 0)
    if ngpu >= 2:
        n = len(model.model.layers)
        for i in range(n // 2, n):
            dmap[f"model.layers.{i}"] = 1
        dmap["model.norm"] = dmap["lm_head"] = 1
    return dmap


def write_json(res: dict, metrics: list[str]) -> str:
    """bench/results/dispatch.json: plain vs dispatched time per metric, interleaved in this run."""
    from results_io import write_result

    rows = [[k, res[k]["plain_ms"], res[k]["shardq_ms"], round(100 * res[k]["overhead"], 1)] for k in metrics]
    head = ", ".join(f"{k} +{100 * res[k]['overhead']:.1f} %" for k in metrics)
    notes = [f"Dispatch overhead ({res['what']}): {head}",
             f"Outputs equal: generate {res['generate_equal']}, 1-token relerr {res['relerr']}; torch {res['torch']}."]
    title = f"Per-block dispatch overhead, {res['entries']} map entries ({res['what']})"
    return str(write_result("dispatch", title, ["metric", "plain ms", "shardq ms", "overhead %"], rows, notes))


def main() -> None:
    from shardq.runtime.dispatch import dispatch_model

    ngpu = torch.cuda.device_count()
    res: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if ngpu else "cpu", "ngpu": ngpu,
                 "what": "2-GPU split" if ngpu >= 2 else "1 GPU: hook overhead only (no inter-GPU copies)"
                 if ngpu else "CPU smoke test"}
    model = build_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=DEV)
    ref = forward(model, ids[:, :1])
    with torch.inference_mode():
        ref_tokens = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    dmap = split_map(model, ngpu)
    hooked = copy.deepcopy(model)
    if ngpu == 0:
        dispatch_model(hooked, {k: "cpu" for k in dmap}, offload_modes="cpu")
    else:  # one GPU: every entry stays on GPU 0 and the hooks still run per block
        dispatch_model(hooked, dmap)
    times = interleaved(model, hooked, ids)
    with torch.inference_mode():
        tokens = hooked.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    out = forward(hooked, ids[:, :1])
    res.update(entries=len(dmap), generate_equal=bool(torch.equal(tokens.cpu(), ref_tokens.cpu())),
               relerr=round(((out.float() - ref.float()).norm() / ref.float().norm()).item(), 6))
    for k, (a, b, ratio) in times.items():
        res[k] = {"plain_ms": round(a, 3), "shardq_ms": round(b, 3), "overhead": round(ratio, 4)}
    with open(os.path.join(OUT, "bench_dispatch.json"), "w") as f:
        json.dump(res, f, indent=1)
    if ngpu:
        print("results:", write_json(res, list(times)))
    print(f"\n{res['gpu']} x{ngpu}, torch {res['torch']}: {res['what']}; {len(dmap)} map entries")
    print(f"{'metric':<26}{'plain ms':>10}{'shardq ms':>11}{'overhead':>10}")
    for k in times:
        r = res[k]
        print(f"{k:<26}{r['plain_ms']:>10.3f}{r['shardq_ms']:>11.3f}{r['overhead']:>10.1%}")
    print(f"generate equal: {res['generate_equal']}, 1-token relerr {res['relerr']}")


class _Echo(torch.nn.Module):
    """A block that does no work, called with the arguments a Llama decoder layer gets."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, hidden, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None):
        return hidden


def cpu_micro(blocks: int = 12, calls: int = 20000) -> None:
    """Host time per block call: plain, torch hooks that move arguments (the earlier design), shardq's wrapper.

    Everything is on the CPU, so this is the pure bookkeeping cost that a launch-bound GPU forward pays on top.
    """
    import timeit

    from transformers import DynamicCache

    from shardq.runtime.dispatch import dispatch_model, move_to

    torch.set_num_threads(1)
    hidden, pos = torch.randn(1, 1, 64), torch.arange(1)[None]
    kwargs = dict(attention_mask=None, position_ids=pos, past_key_values=DynamicCache(), use_cache=True,
                  position_embeddings=(torch.randn(1, 1, 16), torch.randn(1, 1, 16)))
    cpu = torch.device("cpu")
    stacks = {name: torch.nn.ModuleList(_Echo() for _ in range(blocks)) for name in ("plain", "hooks", "shardq")}
    for m in stacks["hooks"]:
        m.register_forward_pre_hook(lambda mod, a, k: move_to((a, k), cpu), with_kwargs=True)
        m.register_forward_hook(lambda mod, a, out: move_to(out, cpu), always_call=True)
    dispatch_model(stacks["shardq"], {str(i): "cpu" for i in range(blocks)}, offload_modes="cpu")

    def run(stack):
        for m in stack:
            m(hidden, **kwargs)

    for _ in range(2):  # second round is the one reported
        us = {k: timeit.timeit(lambda s=s: run(s), number=calls // blocks) / (calls // blocks) / blocks * 1e6
              for k, s in stacks.items()}
    print(f"host µs per block call ({blocks} blocks, Llama-layer arguments): "
          + ", ".join(f"{k} {v:.2f}" for k, v in us.items())
          + f"; added by hooks {us['hooks'] - us['plain']:.2f}, by shardq {us['shardq'] - us['plain']:.2f}")


if __name__ == "__main__":
    cpu_micro() if "--cpu-micro" in sys.argv else main()
