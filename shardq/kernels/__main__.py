"""`python -m shardq.kernels --check`: build, load and check the CUDA kernels (see check.py)."""

import sys

from shardq.kernels.check import run

sys.exit(run())
