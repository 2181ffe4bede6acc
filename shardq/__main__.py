"""`python -m shardq plan ...` previews a placement; `python -m shardq demo` runs the built-in end-to-end job."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"plan": "shardq.cli", "demo": "shardq.demo"}
    if not argv or argv[0] not in commands:
        print("usage: python -m shardq {plan,demo} [options]   (add --help after a command for its options)")
        return 2
    import importlib

    return int(importlib.import_module(commands[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
