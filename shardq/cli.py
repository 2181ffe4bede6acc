"""`python -m shardq plan`: preview where a checkpoint's blocks go under memory caps, reading headers only.

    python -m shardq plan ./my-model --gpus 2x24GB --quant nf4 --max-memory 0=20GB,1=20GB,cpu=64GB
    python -m shardq plan ./my-model/config.json --quant int8 --json      # from a config alone, no weights

Exit status: 0 with a plan, 2 when the input is bad or the model cannot be placed (the message says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardq.config import QuantConfig
    from shardq.planning.placement import Plan

# Mirrors of shardq.planning (tests/test_plan_cli.py pins them), so that --help needs no torch import.
STRATEGIES = ("auto", "sequential", "balanced", "balanced_low_0")
PCIE_GBPS = 25.0
DISK_GBPS = 2.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shardq plan",
        description="Preview a device map: which device holds each block, its bytes as stored, and the budget left. "
        "Reads config.json and safetensors headers only; no weight bytes, no GPU needed.",
    )
    p.add_argument(
        "source",
        help="checkpoint directory (config.json + safetensors, single or sharded), "
        "or a config.json file to plan from the architecture alone",
    )
    p.add_argument(
        "--max-memory",
        metavar="CAPS",
        help="per-device caps, e.g. '0=600MB,1=1GB,cpu=8GB,disk=100GB' or a JSON dict "
        "(default: free GPU memory, available host memory, free disk)",
    )
    p.add_argument("--gpus", metavar="SPEC", help="plan for hypothetical GPUs, e.g. '2x24GB' or '24GB,16GB'")
    p.add_argument("--quant", help="none, int8, nf4 or fp4 (default: the checkpoint's quantization_config, else none)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: quantize the absmax statistics again")
    p.add_argument("--blocksize", type=int, default=64, help="4-bit block size (default 64)")
    p.add_argument(
        "--fp32-cpu-offload",
        action="store_true",
        help="keep CPU blocks unquantized in fp32 and compute them on the CPU",
    )
    p.add_argument("--skip-modules", metavar="NAMES", help="comma-separated modules kept unquantized (default lm_head)")
    p.add_argument(
        "--strategy",
        default="auto",
        choices=STRATEGIES,
        help="auto/balanced spread over the GPUs when "
        "the model fits on them (as transformers), else fill in order; balanced_low_0 spreads over GPUs 1.. "
        "and leaves GPU 0 what they cannot hold; sequential fills GPUs in order",
    )
    p.add_argument("--device-map", metavar="MAP", help="explicit map: JSON dict or a .json file, module -> device")
    p.add_argument("--no-split", metavar="NAMES", help="comma-separated block classes or module names kept whole")
    p.add_argument(
        "--offload-mode",
        choices=("cpu", "stream"),
        help="force how CPU blocks run (default: per block, "
        "see the table's 'why': cpu with --fp32-cpu-offload or no GPU, else embeddings cpu, layers stream)",
    )
    p.add_argument(
        "--offload-mode-for",
        metavar="NAME=MODE",
        action="append",
        help="force the mode (cpu or stream) of the CPU blocks under module NAME, a block or a parent "
        "such as model.layers (repeatable; the longest name wins over --offload-mode)",
    )
    p.add_argument("--batch", type=int, default=1, help="workload batch size for the activation reserve (default 1)")
    p.add_argument(
        "--seq-len", type=int, default=512, help="workload sequence length: prompt + new tokens (default 512)"
    )
    p.add_argument(
        "--no-kv-cache",
        dest="kv_cache",
        action="store_const",
        const=False,
        default=None,
        help="plain forwards: reserve no KV cache or decode graphs (default: reserved for causal LMs)",
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="reserve QLoRA training: adapters with gradients and AdamW states, checkpoints, recompute",
    )
    p.add_argument("--lora-rank", type=int, default=16, metavar="R", help="with --train: LoRA rank (default 16)")
    p.add_argument(
        "--lora-targets",
        metavar="NAMES",
        help="with --train: comma-separated module names the adapters target (default: all linear layers)",
    )
    p.add_argument(
        "--dtype", help="weights dtype: float16/fp16, bfloat16/bf16 or float32/fp32 (default: the checkpoint's)"
    )
    p.add_argument("--offload-dir", help="offload folder; its free space is the default disk budget")
    p.add_argument(
        "--pcie-gbps",
        type=_rate,
        default=PCIE_GBPS,
        metavar="GB/S",
        help=f"host-to-GPU rate for the per-forward transfer estimate (default {PCIE_GBPS:g})",
    )
    p.add_argument(
        "--disk-gbps",
        type=_rate,
        default=DISK_GBPS,
        metavar="GB/S",
        help=f"offload-folder read rate for the per-forward transfer estimate (default {DISK_GBPS:g})",
    )
    p.add_argument(
        "--ranks",
        metavar="SPEC",
        help="pipeline stages over torch.distributed ranks, e.g. '2x(1x24GB)' "
        "or '(1x24GB);(2x16GB)' (each rank's GPUs as --gpus; --max-memory's cpu/disk apply to each)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--full", action="store_true", help="one row per block (no folding of identical layers)")
    return p


def _rate(text: str) -> float:
    """A transfer rate in GB/s: a positive number."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive rate in GB/s, e.g. 25 or 12.5")
    return value


def parse_dtype(text: str | None) -> str | None:
    """A floating dtype by its torch name or a common alias (fp16, bf16, fp32, half) -> the torch name."""
    if text is None:
        return None
    from shardq.config import COMPUTE_DTYPES  # imports torch: only once a plan is asked for, never for --help

    dtype = COMPUTE_DTYPES.get(text.strip().lower().removeprefix("torch."))
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    raise ValueError(f"--dtype {text!r} is not a floating dtype: use float16 (fp16), bfloat16 (bf16) or float32 (fp32)")


def parse_caps(text: str | None) -> dict[str, Any] | None:
    """'0=600MB,cpu=8GB' or a JSON object -> {key: size}; sizes are parsed later by get_max_memory."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            caps = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--max-memory {text!r} is not valid JSON: {exc}") from None
        if not isinstance(caps, dict):
            raise ValueError(f"--max-memory {text!r} must be a JSON object")
        return caps
    caps = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--max-memory entry {part!r} is not DEVICE=SIZE: write e.g. '0=600MB,1=1GB,cpu=8GB'")
        caps[key.strip()] = value.strip()
    return caps


def parse_device_map(text: str | None) -> dict[str, Any] | None:
    """A device map from inline JSON or a JSON file."""
    if text is None:
        return None
    raw = Path(text).read_text() if not text.lstrip().startswith("{") and Path(text).is_file() else text
    try:
        dm = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--device-map is neither a JSON object nor a JSON file: {exc}") from None
    if not isinstance(dm, dict):
        raise ValueError("--device-map must be a JSON object of module names to devices")
    return dm


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _quant(args: argparse.Namespace) -> QuantConfig | None:
    from shardq.config import QuantConfig

    extra = {"double_quant": args.double_quant, "blocksize": args.blocksize, "fp32_cpu_offload": args.fp32_cpu_offload}
    if args.skip_modules is not None:
        extra["skip_modules"] = tuple(_names(args.skip_modules) or ())
    if args.quant is None and not args.fp32_cpu_offload and args.skip_modules is None and not args.double_quant:
        return None  # a pre-quantized checkpoint's own quantization_config applies
    return QuantConfig(method=QuantConfig.from_any(args.quant).method, **extra)


def parse_offload_modes(single: str | None, per_name: list[str] | None) -> str | dict[str, str] | None:
    """--offload-mode and the repeated --offload-mode-for NAME=MODE as the planner's `offload_mode`: a string,
    or a dict where --offload-mode becomes the whole model's entry ("") that longer names override."""
    if not per_name:
        return single
    modes = {"": single} if single is not None else {}
    for item in per_name:
        name, sep, mode = item.rpartition("=")
        if not sep or not mode.strip():
            raise ValueError(f"--offload-mode-for {item!r} is not NAME=MODE: write e.g. 'model.layers=stream'")
        modes[name.strip()] = mode.strip()
    return modes


def check_source(source: Path) -> None:
    """Refuse, with the usage that fits, a source that is neither a checkpoint directory nor a config.json."""
    if not source.exists():
        raise ValueError(
            f"{source} does not exist: give a checkpoint directory (config.json + *.safetensors) or a config.json file"
        )
    if source.is_file() and source.suffix == ".safetensors":
        raise ValueError(
            f"{source} is one safetensors file: give the directory holding it and its config.json "
            f"(python -m shardq plan {source.parent}), or its config.json to plan from the architecture"
        )
    if source.is_file() and source.suffix != ".json":
        raise ValueError(f"{source} is neither a checkpoint directory nor a config.json file")
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise ValueError(
                f"{source} has no config.json: shardq builds the model from the transformers config "
                "saved beside the weights (save_pretrained writes both)"
            )
        if not any(source.glob("*.safetensors")):
            raise ValueError(
                f"{source} has config.json but no *.safetensors weights: plan from the architecture "
                f"alone with `python -m shardq plan {source / 'config.json'}`, or add the checkpoint's "
                "safetensors files (and model.safetensors.index.json if sharded)"
            )


def run(args: argparse.Namespace) -> Plan:
    """Build the plan the arguments describe."""
    from shardq.planning.planner import plan, resolve_dtype

    source = Path(args.source)
    check_source(source)
    dtype = parse_dtype(args.dtype)
    kwargs: dict[str, Any] = dict(
        max_memory=parse_caps(args.max_memory),
        gpus=args.gpus,
        device_map=parse_device_map(args.device_map) or args.strategy,
        no_split=_names(args.no_split),
        workload=(args.batch, args.seq_len),
        offload_mode=parse_offload_modes(args.offload_mode, args.offload_mode_for),
        offload_dir=args.offload_dir,
        **reserve_kwargs(args),
    )
    if source.is_file() and source.suffix == ".json":
        from shardq import hf

        model = hf.meta_model_from_dir(source, resolve_dtype(dtype))
        result = plan(model, _quant(args), **kwargs)
        result.source = os.fspath(source)
        result.warnings.append("planned from config.json alone: the checkpoint's tensors were not checked")
        return result
    return plan(os.fspath(source), _quant(args), dtype=dtype, **kwargs)


def reserve_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`kv_cache` and `training` of the plan from --no-kv-cache, --train, --lora-rank and --lora-targets."""
    if not args.train:
        if args.lora_targets or args.lora_rank != 16:
            raise ValueError("--lora-rank and --lora-targets size training: add --train")
        return {"kv_cache": args.kv_cache}
    from shardq.planning.placement import Training

    targets = tuple(_names(args.lora_targets) or ()) or "all-linear"
    return {"kv_cache": args.kv_cache, "training": Training(args.lora_rank, targets)}


def _ranks(args: argparse.Namespace) -> int:
    """`--ranks`: the multi-rank plan (stages, per-rank placement, link bytes), no process group needed."""
    from shardq.distributed.preview import preview
    from shardq.distributed.stages import format_rank_plan
    from shardq.planning.planner import resolve_dtype

    rp = preview(
        args.source,
        args.ranks,
        _quant(args),
        parse_caps(args.max_memory),
        resolve_dtype(parse_dtype(args.dtype)),
        workload=(args.batch, args.seq_len),
        offload_dir=args.offload_dir,
        **reserve_kwargs(args),
    )
    print(json.dumps(rp.to_dict(), indent=2) if args.json else format_rank_plan(rp))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.ranks:
            return _ranks(args)
        result = run(args)
    except ValueError as exc:  # PlanError, CheckpointError, ModelConfigError, QuantConfigError, bad sizes, sources
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(result.to_json())
    else:
        from shardq.planning.report import format_plan

        print(format_plan(result, full=args.full, pcie_gbps=args.pcie_gbps, disk_gbps=args.disk_gbps))
    return 0
