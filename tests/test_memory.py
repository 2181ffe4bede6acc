"""Size parsing, device keys and default budgets (NVML mocked: working, failing, absent)."""

from __future__ import annotations

import builtins
import math
import sys
import types

import pytest
import torch
from accelerate.utils import convert_file_size_to_int

from shardq import memory
from shardq.memory import get_max_memory, normalize_device, parse_gpus, parse_size


@pytest.mark.parametrize("text,expected", [
    ("600MB", 600 * 10**6), ("1GB", 10**9), ("1.5GiB", int(1.5 * 2**30)), ("512KiB", 512 * 2**10),
    ("10Gb", 10**10 // 8), ("10gb", 10**10 // 8), ("1gib", 2**30), ("2MiB", 2 * 2**20), ("3kb", 3000 // 8),
    ("7KB", 7000), ("1TB", 10**12), ("1TiB", 2**40), ("0GB", 0), ("123", 123), ("  4 GB ", 4 * 10**9),
    (1234, 1234), (0, 0), (2.0**20, 2**20), ("100B", 100), ("0.5GB", 5 * 10**8),
])
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["600MB", "1GB", "1.5GiB", "512KiB", "10Gb", "20MiB", "3.25GB", "7kb", "8Mb",
                                  "0.1GB", "1000KB", "2.5KiB"])
def test_parse_size_matches_accelerate(text):
    assert parse_size(text) == convert_file_size_to_int(text)


@pytest.mark.parametrize("bad", ["10 parsecs", "-1GB", "", "1.2.3MB", float("nan"), True, False, "NaN", None, -5,
                                 "GB", "1 G B", [1], float("inf"), "1e", "--1GB", "1GBB"])
def test_parse_size_bad(bad):
    with pytest.raises(ValueError) as err:
        parse_size(bad)
    msg = str(err.value)
    assert repr(bad) in msg or str(bad) in msg
    assert "600MB" in msg  # the accepted forms are spelled out


@pytest.mark.parametrize("key,expected", [
    (0, 0), ("0", 0), ("1", 1), ("cuda:1", 1), ("CUDA:0", 0), ("cuda", 0), (torch.device("cuda:1"), 1),
    (torch.device("cuda", 0), 0), ("cpu", "cpu"), ("CPU", "cpu"), ("disk", "disk"), (torch.device("cpu"), "cpu"),
])
def test_normalize_device(key, expected):
    assert normalize_device(key, num_gpus=2) == expected


@pytest.mark.parametrize("key", [2, "cuda:5", torch.device("cuda:3")])
def test_normalize_device_missing_gpu_lists_existing(key):
    with pytest.raises(ValueError, match=r"does not exist.*\[0, 1\]"):
        normalize_device(key, num_gpus=2)


def test_normalize_device_no_gpu_here(monkeypatch):
    monkeypatch.setattr(memory, "gpu_count", lambda: 0)
    with pytest.raises(ValueError, match=r"GPUs here are \[none\]"):
        normalize_device(0)


@pytest.mark.parametrize("key", ["mps", "gpu0", -1, True, 1.5, "cuda:x", torch.device("meta")])
def test_normalize_device_bad(key):
    with pytest.raises(ValueError, match="device|GPU"):
        normalize_device(key, num_gpus=2)


def test_parse_gpus():
    assert parse_gpus("2x24GB") == [24 * 10**9] * 2
    assert parse_gpus("24GB,16GiB") == [24 * 10**9, 16 * 2**30]
    assert parse_gpus(["1GB", 5]) == [10**9, 5]
    with pytest.raises(ValueError):
        parse_gpus("0x24GB")
    with pytest.raises(ValueError):
        parse_gpus("2xlots")


def test_explicit_max_memory_normalised_and_ordered():
    got = get_max_memory({"cpu": "2GB", "cuda:1": "1GB", 0: 5, "disk": "1TB"}, gpus="2x24GB")
    assert list(got) == [0, 1, "cpu", "disk"]
    assert got == {0: 5, 1: 10**9, "cpu": 2 * 10**9, "disk": 10**12}


def test_explicit_max_memory_errors():
    with pytest.raises(ValueError, match=r"max_memory\[0\].*parsecs"):
        get_max_memory({0: "10 parsecs"}, gpus="1x24GB")
    with pytest.raises(ValueError, match="twice"):
        get_max_memory({0: "1GB", "cuda:0": "2GB"}, gpus="1x24GB")
    with pytest.raises(ValueError, match=r"GPU 3 does not exist.*\[0, 1\]"):
        get_max_memory({3: "1GB"}, gpus="2x24GB")
    with pytest.raises(ValueError, match="dict"):
        get_max_memory(["1GB"])


def _fake_pynvml(free: list[int], total: list[int], fail: bool = False):
    mod = types.ModuleType("pynvml")
    calls = {"init": 0, "shutdown": 0}

    def init():
        calls["init"] += 1
        if fail:
            raise RuntimeError("NVML Shared Library Not Found")

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("idx", i)
    mod.nvmlDeviceGetHandleByUUID = lambda u: ("uuid", u)

    def info(handle):
        i = handle[1] if handle[0] == "idx" else int(handle[1].split("-")[-1])
        return types.SimpleNamespace(free=free[i], total=total[i], used=total[i] - free[i])

    mod.nvmlDeviceGetMemoryInfo = info
    return mod, calls


@pytest.fixture
def host(monkeypatch):
    monkeypatch.setattr(memory, "host_available_memory", lambda: 10 * 2**30)
    monkeypatch.setattr(memory, "disk_free", lambda path=None: 500 * 2**30)


def test_default_budgets_from_nvml(monkeypatch, host):
    fake, calls = _fake_pynvml([20 * 2**30, 10 * 2**30], [24 * 2**30, 24 * 2**30])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(memory, "gpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: pytest.fail("NVML worked: CUDA must not be touched"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    got = get_max_memory()
    assert got == {0: 20 * 2**30 - memory.GPU_MARGIN, 1: 10 * 2**30 - memory.GPU_MARGIN,
                   "cpu": int(10 * 2**30 * memory.HOST_FRACTION), "disk": 500 * 2**30}
    assert calls["init"] == calls["shutdown"] == 2


def test_nvml_honours_cuda_visible_devices(monkeypatch, host):
    fake, _ = _fake_pynvml([1 * 2**30, 2 * 2**30, 3 * 2**30], [4 * 2**30] * 3)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(memory, "gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-uuid-1")
    got = get_max_memory(gpu_margin=0)
    assert got[0] == 3 * 2**30 and got[1] == 2 * 2**30


def test_nvml_failing_falls_back_to_cuda(monkeypatch, host):
    fake, _ = _fake_pynvml([0], [0], fail=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(memory, "gpu_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (8 * 2**30, 16 * 2**30))
    assert get_max_memory()[0] == 8 * 2**30 - memory.GPU_MARGIN


def test_nvml_absent_falls_back_to_cuda(monkeypatch, host):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    monkeypatch.setattr(memory, "gpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((i + 1) * 2**30, 4 * 2**30))
    got = get_max_memory(gpu_margin=2**20)
    assert got[0] == 2**30 - 2**20 and got[1] == 2 * 2**30 - 2**20


def test_nvml_and_cuda_both_failing_is_a_clear_error(monkeypatch, host):
    fake, _ = _fake_pynvml([0], [0], fail=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(memory, "gpu_count", lambda: 1)

    def broken(i):
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    with pytest.raises(ValueError, match=r"GPU 0 .*NVML Shared Library Not Found.*insufficient.*pass max_memory"):
        get_max_memory()


def test_margin_never_negative(monkeypatch, host):
    monkeypatch.setattr(memory, "gpu_count", lambda: 1)
    monkeypatch.setattr(memory, "gpu_free_memory", lambda i: (100, 200))
    assert get_max_memory()[0] == 0


def test_no_gpu_defaults_have_cpu_and_disk(monkeypatch, host):
    monkeypatch.setattr(memory, "gpu_count", lambda: 0)
    assert get_max_memory() == {"cpu": int(10 * 2**30 * memory.HOST_FRACTION), "disk": 500 * 2**30}


def test_hypothetical_gpus_default_budget(host):
    got = get_max_memory(gpus="2x24GB")
    assert got[0] == got[1] == 24 * 10**9 - memory.GPU_MARGIN


def test_real_host_and_disk_probes():
    assert memory.host_available_memory() > 0
    assert memory.disk_free("/nonexistent/dir/below") > 0


def test_format_size():
    assert memory.format_size(512) == "512 B"
    assert memory.format_size(1536) == "1.50 KiB"
    assert memory.format_size(3 * 2**30) == "3.00 GiB"
    assert not math.isnan(float(memory.format_size(2**50).split()[0]))


def test_import_does_not_initialise_cuda():
    import subprocess

    code = ("import torch, shardq.memory, shardq; import shardq.memory as m; m.parse_size('1GB'); "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_size_warnings_keep_accelerate_parsing():
    """A size without a unit, or with a lowercase 'b' (bits), parses as accelerate does but warns with the fix."""
    import warnings as w

    from shardq.memory import SizeWarning

    with pytest.warns(SizeWarning, match="no unit, so it is 24 bytes"):
        assert parse_size("24") == 24
    with pytest.warns(SizeWarning, match=r"lowercase 'b', which means bits.*'24GB' if you meant bytes"):
        assert parse_size("24gb") == 3 * 10**9
    with w.catch_warnings():
        w.simplefilter("error")
        assert parse_size("24GB") == 24 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(24) == 24
        assert parse_size("24b") == 24  # an explicit byte unit: no warning


def test_gpus_spec_without_unit_warns():
    from shardq.memory import SizeWarning, parse_gpus

    with pytest.warns(SizeWarning, match="no unit"):
        assert parse_gpus("2x24") == [24, 24]
