"""Offload folders can never be shared by accident: one live load owns a folder (lock + owner record), foreign files
and a full disk are refused before anything is placed, and a failed or interrupted load (KeyboardInterrupt at any
point) leaves no file behind. CPU only."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _f_models import save_checkpoint  # noqa: E402

import shardq.checkpoint.source as source  # noqa: E402
import shardq.loading.loader as loader  # noqa: E402
from shardq.hf import meta_model_from_dir  # noqa: E402
from shardq.loading.loader import LoadError, load_sharded  # noqa: E402
from shardq.runtime import offload_folder  # noqa: E402
from shardq.runtime.dispatch import dispatch_model  # noqa: E402
from shardq.runtime.offload import OffloadError, write_disk_offload  # noqa: E402

CAPS = {"cpu": "1GB", "disk": "1GB"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two checkpoints of the same architecture (same block names), different weights."""
    root = tmp_path_factory.mktemp("trust")
    a = save_checkpoint("llama", root / "a", dtype=torch.float32, layers=3, vocab=128)
    torch.manual_seed(123)
    b = save_checkpoint("llama", root / "b", dtype=torch.float32, layers=3, vocab=128)
    from safetensors.torch import load_file, save_file

    t = load_file(str(b / "model.safetensors"))
    save_file({k: v + 0.5 * torch.randn_like(v) for k, v in t.items()}, str(b / "model.safetensors"))
    return a, b


def disk_map(model) -> dict:
    from shardq.hf import no_split_modules
    from shardq.planning.planner import decompose

    units = decompose(model, set(no_split_modules(model)))
    return {u: ("disk" if "layers" in u else "cpu") for u in units}


def load(ckpt: Path, folder: Path, **kw):
    model = meta_model_from_dir(ckpt)
    return load_sharded(model, ckpt, max_memory=CAPS, device_map=disk_map(model), offload_dir=folder,
                        progress=False, **kw)


def reference_logits(ckpt: Path) -> torch.Tensor:
    model = meta_model_from_dir(ckpt)
    model = load_sharded(model, ckpt, max_memory={"cpu": "1GB"}, progress=False)
    return run(model)


def run(model) -> torch.Tensor:
    ids = torch.arange(3, 12).view(1, 9)
    with torch.no_grad():
        return model(input_ids=ids).logits


def listing(folder: Path) -> dict[str, int] | None:
    if not folder.exists():
        return None
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def all_meta(model) -> bool:
    return all(t.device.type == "meta" for t in model.state_dict().values())


# ---------------------------------------------------------------------------------------------------------------
# one folder, one live model


def test_second_model_cannot_take_a_live_models_folder(ckpts, tmp_path):
    a, b = ckpts
    folder = tmp_path / "off"
    first = load(a, folder)
    want = reference_logits(a)
    torch.testing.assert_close(run(first), want)
    before = listing(folder)
    second = meta_model_from_dir(b)
    with pytest.raises(LoadError, match="in use by a live model"):
        load_sharded(second, b, max_memory=CAPS, device_map=disk_map(second), offload_dir=folder, progress=False)
    assert all_meta(second) and listing(folder) == before
    torch.testing.assert_close(run(first), want)  # still its own layers
    with pytest.raises(offload_folder.OffloadFolderError, match="in use"):
        write_disk_offload(folder, "model.layers.0", {"w": torch.ones(2)})  # the low-level writer is refused too


def test_folder_of_a_freed_model_is_cleaned_and_reused(ckpts, tmp_path):
    a, b = ckpts
    folder = tmp_path / "off"
    first = load(a, folder)
    del first
    gc.collect()
    second = load(b, folder)
    torch.testing.assert_close(run(second), reference_logits(b))
    index = json.loads((folder / "index.json").read_text())
    assert index["owner"]["checkpoint"] == os.path.abspath(b)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(index["files"])


def test_dispatch_cannot_pick_up_another_loads_blocks(ckpts, tmp_path):
    """A folder a load left behind is never read as if its blocks were this model's (same names, other weights)."""
    a, b = ckpts
    folder = tmp_path / "off"
    first = load(a, folder)
    del first
    gc.collect()
    model = meta_model_from_dir(b)
    with pytest.raises(OffloadError, match="another load"):
        dispatch_model(model, disk_map(model), offload_dir=folder, execution_device="cpu")


def test_folder_held_by_another_process_is_refused(tmp_path):
    folder = tmp_path / "off"
    code = textwrap.dedent(f"""
        import sys
        from shardq.runtime.offload_folder import claim_folder
        held = claim_folder({str(folder)!r}, 0, ["b"], {{"model": "other"}})
        print("ready", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(offload_folder.OffloadFolderError, match="in use by a live model.*other"):
            offload_folder.claim_folder(folder, 0, ["b"], {"model": "mine"})
    finally:
        proc.communicate("")
    held = offload_folder.claim_folder(folder, 0, ["b"], {"model": "mine"})  # the process is gone: free again
    held.abort()
    assert list(folder.iterdir()) == []  # the stale record cleaned, nothing of this claim left


# ---------------------------------------------------------------------------------------------------------------
# folder problems are found before anything is placed


def test_foreign_index_is_refused_before_loading(ckpts, tmp_path):
    a, _ = ckpts
    folder = tmp_path / "off"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({"someone": "else"}))
    before = listing(folder)
    model = meta_model_from_dir(a)
    with pytest.raises(LoadError, match="no shardq load owns"):
        load_sharded(model, a, max_memory=CAPS, device_map=disk_map(model), offload_dir=folder, progress=False)
    assert all_meta(model) and listing(folder) == before


def test_foreign_block_file_is_refused(ckpts, tmp_path):
    a, _ = ckpts
    folder = tmp_path / "off"
    folder.mkdir()
    (folder / "model.layers.1.safetensors").write_bytes(b"not mine")
    model = meta_model_from_dir(a)
    with pytest.raises(LoadError, match="no shardq load wrote"):
        load_sharded(model, a, max_memory=CAPS, device_map=disk_map(model), offload_dir=folder, progress=False)
    assert (folder / "model.layers.1.safetensors").read_bytes() == b"not mine"
    assert sorted(p.name for p in folder.iterdir()) == ["model.layers.1.safetensors"]


def test_unwritable_folder_is_refused(ckpts, tmp_path):
    a, _ = ckpts
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = meta_model_from_dir(a)
    with pytest.raises(LoadError, match="cannot be written|not a folder"):
        load_sharded(model, a, max_memory=CAPS, device_map=disk_map(model), offload_dir=blocker / "off",
                     progress=False)
    with pytest.raises(LoadError, match="not a folder"):
        load_sharded(model, a, max_memory=CAPS, device_map=disk_map(model), offload_dir=blocker, progress=False)
    assert all_meta(model) and blocker.read_text() == "x"


def test_full_disk_is_refused_before_loading(ckpts, tmp_path, monkeypatch):
    a, _ = ckpts
    folder = tmp_path / "off"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(offload_folder.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    model = meta_model_from_dir(a)
    with pytest.raises(LoadError, match="MiB free but the plan writes"):
        load_sharded(model, a, max_memory=CAPS, device_map=disk_map(model), offload_dir=folder, progress=False)
    assert all_meta(model) and not folder.exists()


def test_disk_full_while_writing_leaves_nothing(ckpts, tmp_path, monkeypatch):
    """ENOSPC on the third block write (the free-space check passed, the disk filled meanwhile)."""
    a, _ = ckpts
    folder = tmp_path / "off"
    real = offload_folder.atomic_save_safetensors
    calls = {"n": 0}

    def full(path, tensors, metadata):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(offload_folder, "atomic_save_safetensors", full)
    with pytest.raises(OSError, match="No space"):
        load(a, folder)
    assert not folder.exists()


# ---------------------------------------------------------------------------------------------------------------
# faults injected at every point of a load


class Fault(Exception):
    pass


def _inject(monkeypatch, at: int | None, exc: type[BaseException]) -> dict:
    """Count calls of every I/O step of a load (tensor reads, block writes, renames, index writes, dispatch) and
    raise `exc` at call number `at`."""
    calls = {"n": 0}

    def wrap(fn):
        def inner(*args, **kw):
            calls["n"] += 1
            if calls["n"] == at:
                raise exc("injected")
            return fn(*args, **kw)
        return inner

    from safetensors import torch as st

    monkeypatch.setattr(source, "read_tensor", wrap(source.read_tensor))
    monkeypatch.setattr(st, "save_file", wrap(st.save_file))
    monkeypatch.setattr(offload_folder.os, "replace", wrap(os.replace))
    monkeypatch.setattr(offload_folder.os, "fsync", wrap(os.fsync))
    monkeypatch.setattr(loader, "claim_folder", wrap(loader.claim_folder))
    monkeypatch.setattr(loader, "flush_disk_block", wrap(loader.flush_disk_block))
    monkeypatch.setattr(loader, "dispatch_model", wrap(loader.dispatch_model))
    return calls


@pytest.mark.parametrize("exc", [KeyboardInterrupt, Fault])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupt_at_every_point_leaves_no_file(ckpts, tmp_path, monkeypatch, exc, existing):
    a, _ = ckpts
    folder = tmp_path / "off"
    if existing:  # a user folder with a file of its own
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    with monkeypatch.context() as m:
        total = _inject(m, None, exc)
        load(a, folder)
        n = total["n"]
    gc.collect()
    assert n > 20
    for at in range(1, n + 1):
        for p in folder.iterdir() if folder.exists() else []:  # the clean run's files: not this test's subject
            if p.name != "notes.txt":
                p.unlink()
        if not existing and folder.exists():
            folder.rmdir()
        before = listing(folder)
        with monkeypatch.context() as m:
            _inject(m, at, exc)
            with pytest.raises(exc):
                load(a, folder)
        assert listing(folder) == before, f"fault at step {at} of {n} left files"
        assert offload_folder.live_folder(folder) is None
    model = load(a, folder)  # and the folder loads cleanly afterwards
    torch.testing.assert_close(run(model), reference_logits(a))


def test_temp_names_are_unique(tmp_path, monkeypatch):
    seen = []
    real = offload_folder.tempfile.mkstemp

    def spy(*args, **kw):
        fd, name = real(*args, **kw)
        seen.append(name)
        return fd, name

    monkeypatch.setattr(offload_folder.tempfile, "mkstemp", spy)
    for i in range(3):
        write_disk_offload(tmp_path, f"b{i}", {"w": torch.ones(3)})
    assert len(seen) == 6 and len(set(seen)) == 6
    assert all(Path(s).name.startswith(offload_folder.TMP_PREFIX) for s in seen)
    assert not list(tmp_path.glob(offload_folder.TMP_PREFIX + "*"))
