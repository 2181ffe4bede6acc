"""Build csrc/*.cu into one shared library with nvcc alone (no torch headers), cached on disk.

The library is independent of the torch version: plain `extern "C"` launchers taking raw pointers, sizes and a
stream. The cache key hashes the sources, the nvcc flags and `nvcc --version`, so editing a kernel or changing
the toolkit rebuilds it; a finished build is published with an atomic rename, so concurrent processes never
load a half-written library.

Environment: SHARDQ_CSRC (sources dir), SHARDQ_CACHE (cache root, default ~/.cache/shardq/kernels),
SHARDQ_CUDA_ARCHS (e.g. "80;90", default "80;90" plus PTX of the newest for later GPUs), CUDA_HOME/CUDA_PATH.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

LIB_NAME = "libshardq_kernels.so"
DEFAULT_ARCHS = ("80", "90")


class BuildError(RuntimeError):
    """The extension could not be built; the message carries the compiler's output."""


@dataclass(frozen=True)
class Toolchain:
    nvcc: str
    version: str


def csrc_dir() -> Path:
    """Directory of the CUDA sources: $SHARDQ_CSRC, else csrc/ next to the shardq package."""
    env = os.environ.get("SHARDQ_CSRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "csrc"


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def toolchain() -> Toolchain:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc was not found: install the CUDA toolkit (matching your driver) or set CUDA_HOME")
    proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise BuildError(f"`{nvcc} --version` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return Toolchain(nvcc=nvcc, version=proc.stdout.strip())


# Archs whose SASS is built with the arch-specific features (Hopper's wgmma): "90" builds sm_90a, which runs on
# every compute capability 9.0 GPU; the PTX shipped for later GPUs stays the portable compute_90.
ARCH_SPECIFIC = {"90": "90a"}


def arch_flags(archs: tuple[str, ...] | None = None) -> list[str]:
    """-gencode flags: SASS for each arch (90 as sm_90a), plus portable PTX of the newest so later GPUs can JIT it."""
    if archs is None:
        env = os.environ.get("SHARDQ_CUDA_ARCHS")
        archs = tuple(a.strip() for a in env.replace(",", ";").split(";") if a.strip()) if env else DEFAULT_ARCHS
    plain = [a.rstrip("a") for a in archs]
    flags = []
    for a in dict.fromkeys(plain):
        sass = ARCH_SPECIFIC.get(a, a)
        flags += ["-gencode", f"arch=compute_{sass},code=sm_{sass}"]
    newest = max(plain, key=int)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def common_flags() -> list[str]:
    return ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-lineinfo"]


def sources(src: Path | None = None) -> list[Path]:
    src = src or csrc_dir()
    files = sorted(src.glob("*.cu"))
    if not files:
        raise BuildError(f"no CUDA sources in {src}: set SHARDQ_CSRC to shardq's csrc/ directory")
    return files


def cache_key(tc: Toolchain, flags: list[str], src: Path | None = None) -> str:
    src = src or csrc_dir()
    h = hashlib.sha256()
    for f in sorted(list(src.glob("*.cu")) + list(src.glob("*.cuh"))):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(tc.version.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("SHARDQ_CACHE", Path.home() / ".cache" / "shardq" / "kernels"))


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out = (proc.stderr + proc.stdout).strip()
        raise BuildError(f"{' '.join(cmd)}\n{out[-4000:]}")


def compile_library(
    out_path: Path, archs: tuple[str, ...] | None = None, jobs: int | None = None, src: Path | None = None
) -> Path:
    """Compile every csrc/*.cu (in parallel) and link them into `out_path`. Raises BuildError."""
    tc = toolchain()
    flags = common_flags() + arch_flags(archs)
    files = sources(src)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".build-") as tmp:
        objs = [Path(tmp) / (f.stem + ".o") for f in files]
        cmds = [[tc.nvcc, *flags, "-c", str(f), "-o", str(o)] for f, o in zip(files, objs)]
        with ThreadPoolExecutor(max_workers=jobs or max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
            list(pool.map(_run, cmds))
        staged = Path(tmp) / LIB_NAME
        _run([tc.nvcc, "-shared", *arch_flags(archs), *[str(o) for o in objs], "-o", str(staged)])
        os.replace(staged, out_path)
    return out_path


def built_library() -> Path:
    """Path of the library for the current sources, building it into the cache if needed."""
    tc = toolchain()
    key = cache_key(tc, common_flags() + arch_flags())
    path = cache_root() / key / LIB_NAME
    if not path.is_file():
        compile_library(path)
    return path
