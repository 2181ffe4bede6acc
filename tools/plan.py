#!/usr/bin/env python3
"""Preview a shardq placement: `python tools/plan.py CHECKPOINT_DIR [options]` (same as `python -m shardq plan`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardq.cli import main  # noqa: E402  (after the path set-up, so a source checkout works uninstalled)

if __name__ == "__main__":
    sys.exit(main())
