"""`python -m shardq` (or the `shardq` script): the command-line entry point.

Only argument parsing happens here, so `--help` answers at once without importing torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "plan": ("shardq.cli", "preview where a checkpoint's blocks go under memory caps (headers only, no GPU)"),
    "demo": ("shardq.demo", "the built-in end-to-end job: save a small Llama, plan, load under caps, generate"),
}

USAGE = """usage: python -m shardq {plan,demo} [options]

Run models that do not fit on your GPUs: plan a device map under max_memory caps, quantize blocks to
int8/nf4/fp4 as they stream in from safetensors, run the forward across GPUs, CPU and disk.

commands:
%s

examples:
  python -m shardq plan ./my-model --gpus 2x24GB --quant nf4
  python -m shardq plan ./my-model/config.json --max-memory 0=20GB,cpu=64GB --json
  python -m shardq demo --quant int8
  python -m shardq.kernels --check        # build and check the CUDA kernels (needs a GPU)

Add --help after a command for its options. Python API: shardq.load_sharded_from_dir, shardq.plan (README.md)."""


def usage() -> str:
    """The top-level help text, one line per command."""
    return USAGE % "\n".join(f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    """Run a command; 0 for --help, 2 (with the usage) for a missing or unknown command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        from shardq import __version__

        print(f"shardq {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = "no command given" if not argv else f"unknown command {argv[0]!r}"
        print(f"{usage()}\n\nerror: {problem}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
