"""Kernels package without a GPU: csrc/ compiles with nvcc (if present), registration is cheap and lazy,
a failed build falls back to the reference with one warning that carries the compiler's message."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import warnings

import pytest
import torch

import shardq.kernels.ops  # noqa: F401
from shardq.kernels import build, cuda_ops, lib, ops

HAS_NVCC = build.find_nvcc() is not None


@pytest.mark.kernel_build
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found")
def test_csrc_compiles_and_exports_every_launcher():
    """The whole of csrc/ for sm_80 and sm_90a (minutes on 2 cores): `make kernels` runs it after
    `python -m shardq.kernels --build` filled the cache, so the library is the cached one, built once per source."""
    so = build.built_library()
    loaded = ctypes.CDLL(str(so))  # no CUDA call: loading needs no GPU
    assert loaded.shardq_abi_version() == lib.ABI_VERSION
    for name in lib.SIGNATURES:
        assert hasattr(loaded, name), f"{name} missing from {so}"
    _check_tc_refusals(loaded)
    _check_fused_refusals(loaded, "shardq_gemm_4bit_wgmma")
    _check_int8_fused_refusals(loaded)
    _check_flat_refusals(loaded)
    _check_grouped_refusals(loaded)


def _check_grouped_refusals(loaded: ctypes.CDLL) -> None:
    """shardq_grouped_gemm_4bit refuses, before any CUDA call, what it cannot run: grouped_gemm_4bit then runs each
    expert through gemm_4bit."""
    fn = loaded.shardq_grouped_gemm_4bit
    fn.argtypes, fn.restype = lib.SIGNATURES["shardq_grouped_gemm_4bit"], ctypes.c_int
    ok = dict(x=4096, w=8192, T=4, E=8, N=1000, K=1024, bs=64, dtype=0, absmax=64, q=None)
    bad = [dict(K=1000), dict(K=64), dict(K=0), dict(T=0), dict(E=0), dict(E=257), dict(N=0), dict(dtype=2),
           dict(bs=48), dict(bs=16), dict(x=4104), dict(w=8200), dict(absmax=None), dict(absmax=None, q=512),
           dict(T=2**31)]
    for change in bad:
        a = dict(ok, **change)
        rc = fn(a["x"], 32, a["w"], a["absmax"], a["q"], None, None, None, 128, 256, a["T"], a["E"], a["N"], a["K"],
                a["bs"], a["dtype"], None)
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{change}: rc {rc}"


def _check_tc_refusals(loaded: ctypes.CDLL) -> None:
    """shardq_gemm_4bit_tc (the default small-M kernel) refuses, before any CUDA call (so without a GPU), what it
    cannot run: cudaErrorNotSupported sends gemm_4bit to the K-split kernel."""
    fn = loaded.shardq_gemm_4bit_tc
    fn.argtypes, fn.restype = lib.SIGNATURES["shardq_gemm_4bit_tc"], ctypes.c_int
    ok = dict(x=4096, w=8192, M=1, N=1000, K=1024, bs=64, dtype=0)
    bad = [dict(K=4097), dict(K=4128), dict(K=64), dict(M=33), dict(M=0), dict(dtype=2), dict(bs=48), dict(bs=32),
           dict(bs=16), dict(x=4104), dict(w=8200)]
    for change in bad:
        a = dict(ok, **change)
        rc = fn(a["x"], a["w"], 64, None, None, None, 0.0, 128, None, 256, a["M"], a["N"], a["K"], a["bs"],
                a["dtype"], None)
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{change}: rc {rc}"


def _check_fused_refusals(loaded: ctypes.CDLL, name: str) -> None:
    """The large-M fused-dequant launchers (wgmma: Hopper, default; mid: opt-in) refuse, before any CUDA call, what
    they cannot run: gemm_4bit then dequantizes and uses cuBLAS."""
    fn = getattr(loaded, name)
    fn.argtypes, fn.restype = lib.SIGNATURES[name], ctypes.c_int
    ok = dict(x=4096, w=8192, M=256, N=1000, K=1024, bs=64, dtype=0, absmax=64)
    bad = [dict(K=4097), dict(K=4128), dict(K=32), dict(M=0), dict(N=0), dict(dtype=2), dict(bs=48), dict(bs=32),
           dict(bs=16), dict(x=4104), dict(w=8200), dict(absmax=None), dict(M=2**31), dict(M=2**30, N=2**30)]
    wgmma = name == "shardq_gemm_4bit_wgmma"  # takes a workspace and a K-split count after out / blocksize
    if wgmma:
        ok.update(ws=512, splits=2)
        bad += [dict(splits=0), dict(splits=65), dict(splits=17), dict(ws=None)]  # K = 1024: 16 k-tiles at most
    for change in bad:
        a = dict(ok, **change)
        head = (a["x"], a["w"], a["absmax"], None, None, None, 0.0, 128, None, 256)
        if wgmma:
            rc = fn(*head, a["ws"], a["M"], a["N"], a["K"], a["bs"], a["splits"], a["dtype"], None)
        else:
            rc = fn(*head, a["M"], a["N"], a["K"], a["bs"], a["dtype"], None)
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{name} {change}: rc {rc}"


class _RefusingLib:
    """Stands in for the loaded library: records each launcher called; every one refuses except `takes`."""

    def __init__(self, takes: str | None):
        self.takes, self.calls = takes, []

    def __getattr__(self, name: str):
        def launcher(*args):
            self.calls.append(name.removeprefix("shardq_"))
            return 0 if name == self.takes else lib.CUDA_ERROR_NOT_SUPPORTED

        return launcher


_SMALL16 = ["gemm_4bit_gemv", "gemm_4bit_tc", "gemm_4bit_small"]


@pytest.mark.parametrize("dtype,m,flat_on,takes,expect,done", [
    (torch.float32, 2, True, "shardq_gemm_4bit_flat", ["gemm_4bit_f32", "gemm_4bit_flat"], True),
    (torch.float32, 8, True, "shardq_gemm_4bit_flat", ["gemm_4bit_f32", "gemm_4bit_flat"], True),
    (torch.float32, 1, False, "shardq_gemm_4bit_flat", ["gemm_4bit_f32"], False),  # switched off
    (torch.float16, 1, True, "shardq_gemm_4bit_flat", _SMALL16 + ["gemm_4bit_flat"], True),
    (torch.bfloat16, 8, True, "shardq_gemm_4bit_flat", _SMALL16 + ["gemm_4bit_flat"], True),
    (torch.float16, 9, True, "shardq_gemm_4bit_flat",  # M > FLAT_MAX_M (M > 8: the ring kernel's K in parts too)
     ["gemm_4bit_gemv", "gemm_4bit_tc", "gemm_4bit_tc_split", "gemm_4bit_small"], False),
    (torch.float16, 1, False, "shardq_gemm_4bit_flat", _SMALL16, False),
])
def test_small_m_routing_of_unaligned_rows(monkeypatch, dtype, m, flat_on, takes, expect, done):
    """Where every other small-M kernel refuses the layout (here K = 33: rows start mid-byte), M <= FLAT_MAX_M goes
    to the flat-array kernel, and False sends the op to dequantize + cuBLAS."""
    monkeypatch.setattr(cuda_ops, "_stream", lambda t: 0)
    monkeypatch.setattr(cuda_ops, "GEMM4_FLAT", flat_on)
    fake = _RefusingLib(takes)
    x = torch.zeros(m, 33, dtype=dtype)
    out = torch.empty(m, 5, dtype=dtype)
    packed, code = torch.zeros(83, dtype=torch.uint8), torch.zeros(16)
    am = (packed.data_ptr(), None, None, None, 0.0)
    assert cuda_ops._gemm_4bit_small(fake, x, packed, am, code, 64, 5, 33, None, out) is done
    assert fake.calls == expect


def test_wgmma_routing_and_k_split(monkeypatch):
    """Which M and shapes the op sends to csrc/gemm_4bit_wgmma.cu, and how many K runs it asks for (a pure function
    of the shape and the SM count)."""
    monkeypatch.setattr(cuda_ops, "_sm_count", lambda index: 132)
    dev = torch.device("cuda", 0)
    assert cuda_ops.wgmma_splits(64, 28672, 8192, dev) == 1  # 224 CTAs: no split
    assert cuda_ops.wgmma_splits(128, 11008, 4096, dev) == 1  # 86 CTAs >= half the SMs
    assert cuda_ops.wgmma_splits(64, 4096, 11008, dev) == 5  # 32 CTAs: 5 runs of 34-35 k-tiles
    assert cuda_ops.wgmma_splits(33, 1000, 11008, dev) == 8  # 8 CTAs: capped at WGMMA_MAX_SPLITS
    assert cuda_ops.wgmma_splits(64, 4096, 4096, dev) == 0  # narrow, K too short to split: dequantize + cuBLAS
    monkeypatch.setattr(cuda_ops, "WGMMA_SPLIT_MIN_K", 0)
    assert cuda_ops.wgmma_splits(64, 4096, 4096, dev) == 5  # 5 runs of 12-13 k-tiles
    assert cuda_ops.wgmma_splits(64, 4096, 512, dev) == 1  # 8 k-tiles: too few to split
    assert cuda_ops.wgmma_splits(32, 28672, 8192, dev) == 0 and cuda_ops.wgmma_splits(129, 28672, 8192, dev) == 0
    monkeypatch.setattr(cuda_ops, "GEMM4_WGMMA", False)
    assert cuda_ops.wgmma_splits(64, 28672, 8192, dev) == 0


def _check_flat_refusals(loaded: ctypes.CDLL) -> None:
    """shardq_gemm_4bit_flat (M <= 8, any K) refuses, before any CUDA call, what it cannot run: gemm_4bit then
    dequantizes and uses cuBLAS."""
    fn = loaded.shardq_gemm_4bit_flat
    fn.argtypes, fn.restype = lib.SIGNATURES["shardq_gemm_4bit_flat"], ctypes.c_int
    ok = dict(w=8192, M=1, N=1000, K=4097, bs=64, dtype=0, absmax=64)
    bad = [dict(M=0), dict(M=9), dict(N=0), dict(K=0), dict(dtype=5), dict(bs=16), dict(bs=48), dict(w=8200),
           dict(absmax=None), dict(K=2**21)]
    for change in bad:
        a = dict(ok, **change)
        rc = fn(4096, a["w"], a["absmax"], None, None, None, 0.0, 128, None, 256, a["M"], a["N"], a["K"], a["bs"],
                a["dtype"], None)
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{change}: rc {rc}"


def _check_int8_fused_refusals(loaded: ctypes.CDLL) -> None:
    """shardq_int8_gemv_fused (M <= 4) refuses, before any CUDA call, what it cannot run (the two-launch path runs):
    K % 32 != 0 is taken for M = 1 up to K = 16384 and for 2 <= M <= 4 where the staged q rows fit in 96 KB."""
    fn = loaded.shardq_int8_gemv_fused
    fn.argtypes, fn.restype = lib.SIGNATURES["shardq_int8_gemv_fused"], ctypes.c_int
    ok = dict(x=4096, w=8192, M=1, K=1024, dtype=0)
    bad = [dict(M=5), dict(M=0), dict(M=2, K=49001), dict(M=4, K=24001), dict(K=16400), dict(K=0), dict(dtype=2),
           dict(x=4104), dict(w=8200), dict(x=4104, K=1000), dict(M=4, K=32768)]  # the last: q [M, K] does not fit
    for change in bad:
        a = dict(ok, **change)
        rc = fn(a["x"], a["w"], 64, None, 128, a["M"], 1000, a["K"], 6.0, a["dtype"], None)
        assert rc == lib.CUDA_ERROR_NOT_SUPPORTED, f"{change}: rc {rc}"


def test_cuda_kernels_registered_beside_reference():
    for name in cuda_ops.KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"shardq::{name}", "CUDA"), name
        assert ops.reference(name) is getattr(shardq.kernels.ops, name)._init_fn


def test_import_does_not_build_or_touch_gpu():
    code = ("import torch; torch.cuda.init = None; import shardq.kernels.ops; from shardq.kernels import lib; "
            "assert not lib._state['tried']")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_key_follows_sources(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "a.cu").write_text("// one\n")
    tc = build.Toolchain(nvcc="nvcc", version="13.0")
    k1 = build.cache_key(tc, ["-O3"], src)
    (src / "a.cu").write_text("// two\n")
    assert build.cache_key(tc, ["-O3"], src) != k1
    assert build.cache_key(build.Toolchain("nvcc", "12.4"), ["-O3"], src) != build.cache_key(tc, ["-O3"], src)


def test_arch_flags_include_ptx_of_newest(monkeypatch):
    monkeypatch.setenv("SHARDQ_CUDA_ARCHS", "80;90")
    flags = build.arch_flags()
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=compute_90" in flags
    assert "arch=compute_90a,code=sm_90a" in flags  # Hopper SASS with wgmma (csrc/gemm_4bit_wgmma.cu)
    assert "arch=compute_90,code=sm_90" not in flags
    monkeypatch.setenv("SHARDQ_CUDA_ARCHS", "90a")
    assert build.arch_flags() == ["-gencode", "arch=compute_90a,code=sm_90a", "-gencode",
                                  "arch=compute_90,code=compute_90"]


@pytest.fixture
def fresh_lib(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDQ_CACHE", str(tmp_path / "cache"))
    lib.reset_for_tests()
    yield
    lib.reset_for_tests()


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found")
def test_build_error_warns_once_with_compiler_message(fresh_lib, monkeypatch, tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cu").write_text("int f() { return undefined_symbol_xyz; }\n")
    monkeypatch.setenv("SHARDQ_CSRC", str(src))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lib.load() is None
        assert lib.load() is None
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "undefined_symbol_xyz" in msgs[0] and "reference" in msgs[0]
    assert "undefined_symbol_xyz" in lib.error()


def test_missing_nvcc_is_reported(fresh_lib, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.warns(RuntimeWarning, match="nvcc was not found"):
        assert lib.load() is None


def test_fallback_wrappers_use_reference(fresh_lib, monkeypatch):
    """With the library unavailable, each CUDA wrapper returns exactly what the reference returns."""
    monkeypatch.setenv("SHARDQ_DISABLE_KERNELS", "1")
    from shardq.formats import codebooks

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    code = codebooks.code_4bit("nf4")
    x = torch.randn(3, 64, generator=g)
    with pytest.warns(RuntimeWarning, match="SHARDQ_DISABLE_KERNELS"):
        packed, absmax = cuda_ops.quantize_4bit(w, code, 64)
    rp, ra = ops.reference("quantize_4bit")(w, code, 64)
    assert torch.equal(packed, rp) and torch.equal(absmax, ra)
    out = cuda_ops.gemm_4bit(x, packed, absmax, code, 64, 24, 64, None, None, 0.0, None)
    assert torch.equal(out, ops.reference("gemm_4bit")(x, packed, absmax, code, 64, 24, 64, None, None, 0.0,
                                                            None))
    q, s = cuda_ops.quantize_int8_rowwise(w)
    assert torch.equal(cuda_ops.int8_linear(x, q, s, None, 6.0),
                       ops.reference("int8_linear")(x, q, s, None, 6.0))


def test_check_cli_without_gpu_says_so_before_building(fresh_lib, monkeypatch, capsys):
    """No GPU: --check reports it at once and exits 1, without building (a build takes minutes)."""
    from shardq.kernels import check

    if torch.cuda.is_available():
        pytest.skip("covered by the GPU run")

    def no_build():
        raise AssertionError("--check built the library without a GPU")

    monkeypatch.setattr(build, "built_library", no_build)
    assert check.run(["--check"]) == 1
    assert "no CUDA GPU visible" in capsys.readouterr().out


def test_build_only_reports_the_compiler_message(monkeypatch, capsys):
    """--build without nvcc (or with a failing compile) exits 1 with the reason; with a library, 0 and its path."""
    from shardq.kernels import check

    def fail():
        raise build.BuildError("nvcc was not found: install the CUDA toolkit")

    monkeypatch.setattr(build, "built_library", fail)
    assert check.run(["--build"]) == 1
    assert "nvcc was not found" in capsys.readouterr().err
    monkeypatch.setattr(build, "built_library", lambda: build.cache_root() / "k" / build.LIB_NAME)
    assert check.run(["--build"]) == 0
    assert build.LIB_NAME in capsys.readouterr().out


def test_check_cases_on_the_cpu_ops():
    """The --check cases (aligned and odd K, 4-bit and int8) are well-formed calls: on the CPU, where the ops are
    the reference, every row is exact."""
    from shardq.kernels import check

    rows = check._cases(torch.device("cpu"))
    assert {r.case for r in rows} >= {"nf4 K=1001 M=5", "K=1001 M=1 thr=6"}
    assert all(r.ok and r.rel_err == 0.0 for r in rows), [r for r in rows if r.rel_err]
