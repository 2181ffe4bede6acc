"""An offload folder owned by one load: a lock, an owner record, atomic writes, and removal of everything it wrote.

Disk blocks of a loaded model are read from its offload folder for as long as the model lives, so a second load
must never write into that folder (same block names → the first model silently computes with the second model's
weights). `claim_folder` makes a load the folder's only writer and reader:

- a lock (`flock` on `.shardq.lock`, exclusive, non-blocking) held until the model is freed or the load fails:
  a folder in use by a live model, in this process or another, is refused with an error saying who holds it;
- an owner record inside `index.json` (pid, host, checkpoint, start time) and the list of files the load will
  write, recorded *before* each file is created, so that what an interrupted or killed load left is known;
- checks before anything is placed: the folder can be created and written, no file the load would write belongs
  to someone else (a foreign `index.json`, block files not listed by a previous shardq load), and the free space
  covers the plan's disk bytes;
- every file is written under a unique temporary name and renamed into place (`os.replace`), so a reader never
  sees half a file and two writers never share a temporary file;
- `abort()` (any failure of the load, KeyboardInterrupt included) removes every file the load wrote, the
  record, the lock file and the folder itself when the load created it.

A folder left by a load whose model is gone (lock free, record present) is cleaned before reuse: the files its
record lists are removed and written again, never reused unverified.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

INDEX_NAME = "index.json"
LOCK_NAME = ".shardq.lock"
TMP_PREFIX = ".shardq-tmp-"
INDEX_FORMAT = "shardq-offload-1"
SLACK_BYTES = 4 * 2**20  # free space kept beyond the plan's disk bytes (file system metadata, the index)

_LIVE: weakref.WeakValueDictionary[str, OffloadFolder] = weakref.WeakValueDictionary()
_LIVE_GUARD = threading.Lock()


class OffloadFolderError(ValueError):
    """An offload folder that cannot be used: in use by another model, holding foreign files, not writable, full."""


def block_file(module_name: str) -> str:
    """The file name of a block in the offload folder."""
    return (module_name or "_root") + ".safetensors"


def _key(path: Path) -> str:
    return os.path.realpath(path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a unique temporary file in the same folder and one rename."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(Path(tmp))
        raise


def atomic_save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file` to a unique temporary name, then renamed onto `path`."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        _unlink(Path(tmp))
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "unreadable"


def is_owned_index(index: Any) -> bool:
    """Whether `index` (a parsed index.json) was written by a `claim_folder` load."""
    return isinstance(index, dict) and index.get("format") == INDEX_FORMAT and isinstance(index.get("owner"), dict)


def lock_folder(path: Path) -> int:
    """Open and exclusively lock the folder's lock file; raise if another live load holds it."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            owner = _read_json(path / INDEX_NAME)
            who = owner.get("owner") if isinstance(owner, dict) else None
            raise OffloadFolderError(
                f"offload folder {path} is in use by a live model (owner: {who or 'another process'}): a folder "
                "holds one model's disk blocks for as long as that model lives; pass another offload_dir, or free "
                "the other model first (del model; gc.collect())"
            ) from None
        raise
    return fd


@dataclass(eq=False)
class OffloadFolder:
    """The offload folder of one load (see the module docstring). Use `write_block`, then `seal()` when the load
    succeeded or `abort()` when it failed; `release()` (or the model being freed) drops the lock."""

    path: Path
    owner: dict[str, Any]
    created: bool
    lock_fd: int | None
    index: dict[str, Any] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    sealed: bool = False

    def _save_index(self) -> None:
        atomic_write_bytes(self.path / INDEX_NAME, json.dumps(self.index, indent=1).encode())

    def write_block(
        self, module_name: str, tensors: Mapping[str, torch.Tensor], dtype_names: Mapping[torch.dtype, str], fmt: str
    ) -> Path:
        """Write one block's CPU tensors as a safetensors file and index it; the file is recorded first."""
        if self.sealed or self.lock_fd is None:
            raise OffloadFolderError(
                f"offload folder {self.path} is in use by a loaded model: its blocks cannot be "
                "rewritten; load into another offload_dir"
            )
        path = self.path / block_file(module_name)
        if path.name not in self.index["files"]:
            self.index["files"].append(path.name)
            self._save_index()  # the record names the file before it exists: a killed load's files are known
        self.written.append(path)
        atomic_save_safetensors(path, tensors, {"format": fmt, "block": module_name})
        self.index["blocks"][module_name] = {
            "file": path.name,
            "tensors": {k: {"dtype": dtype_names[t.dtype], "shape": list(t.shape)} for k, t in tensors.items()},
        }
        self._save_index()
        return path

    def seal(self) -> None:
        """The load succeeded: no more writes; the lock stays held until the model is freed."""
        self.sealed = True

    def release(self) -> None:
        """Drop the lock (the model is gone); the files stay, cleaned by the next load of this folder."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        with _LIVE_GUARD:
            if _LIVE.get(_key(self.path)) is self:
                del _LIVE[_key(self.path)]

    def abort(self) -> None:
        """Remove every file this load wrote (and its temporaries, record, lock, and the folder if it made it)."""
        for p in set(self.written) | {self.path / INDEX_NAME}:
            _unlink(p)
        for p in self.path.glob(TMP_PREFIX + "*"):
            _unlink(p)
        _unlink(self.path / LOCK_NAME)
        self.release()
        if self.created:
            try:
                self.path.rmdir()
            except OSError:
                pass  # someone else put files there meanwhile: theirs stay

    def __del__(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def live_folder(path: str | os.PathLike) -> OffloadFolder | None:
    """The folder object of a load of this process that holds `path`, if any."""
    with _LIVE_GUARD:
        return _LIVE.get(_key(Path(path)))


def claim_folder(
    path: str | os.PathLike, disk_bytes: int, blocks: list[str], owner: Mapping[str, Any]
) -> OffloadFolder:
    """Make this load the only user of the offload folder `path`, after checking everything a load needs from it
    (writable, no foreign files where the load writes, `disk_bytes` of free space). Raises `OffloadFolderError`
    with nothing left behind."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OffloadFolderError(f"offload_dir {folder} exists and is not a folder: pass a folder path")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        had_lock = (folder / LOCK_NAME).exists()
        fd = lock_folder(folder)
    except OSError as e:
        raise OffloadFolderError(
            f"offload folder {folder} cannot be written ({e.strerror or e}): pass an offload_dir you can write to"
        ) from None
    claimed = OffloadFolder(folder, dict(owner), created, fd)
    try:
        _clear_stale(folder, blocks)
        _check_space(folder, disk_bytes)
        claimed.owner.update(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        claimed.index = {"format": INDEX_FORMAT, "owner": claimed.owner, "files": [], "blocks": {}}
        claimed._save_index()
    except BaseException:
        _undo_claim(claimed, had_lock)
        raise
    with _LIVE_GUARD:
        _LIVE[_key(folder)] = claimed
    return claimed


def _undo_claim(claimed: OffloadFolder, had_lock: bool) -> None:
    """A claim refused after the lock was taken: leave the folder as it was found."""
    if claimed.created:
        claimed.abort()
        return
    index = _read_json(claimed.path / INDEX_NAME)
    if is_owned_index(index) and index["owner"] == claimed.owner:
        _unlink(claimed.path / INDEX_NAME)
    if not had_lock:
        _unlink(claimed.path / LOCK_NAME)
    claimed.release()


def _clear_stale(folder: Path, blocks: list[str]) -> None:
    """Remove what a finished or killed load left (its record lists it); refuse files that are someone else's."""
    index = _read_json(folder / INDEX_NAME)
    listed: set[str] = set()
    if index is not None:
        if not is_owned_index(index):
            raise OffloadFolderError(
                f"offload folder {folder} already holds an {INDEX_NAME} that no shardq load owns (another tool's, "
                "or blocks written by hand with write_disk_offload): shardq will not mix its blocks with them; pass "
                "an empty or new offload_dir, or delete that folder's contents"
            )
        listed = {str(f) for f in index.get("files", [])} | {
            str(b.get("file")) for b in index["blocks"].values() if isinstance(b, dict)
        }
    listed = {f for f in listed if f and "/" not in f and f not in (INDEX_NAME, LOCK_NAME)}
    foreign = [block_file(b) for b in blocks if (folder / block_file(b)).exists() and block_file(b) not in listed]
    if foreign:
        raise OffloadFolderError(
            f"offload folder {folder} already holds {foreign[:3]} which no shardq load wrote: "
            "pass an empty or new offload_dir, or remove those files"
        )
    for name in listed:
        _unlink(folder / name)
    for p in folder.glob(TMP_PREFIX + "*"):
        _unlink(p)
    if index is not None:
        _unlink(folder / INDEX_NAME)


def _check_space(folder: Path, disk_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if disk_bytes + SLACK_BYTES > free:
        raise OffloadFolderError(
            f"offload folder {folder} has {free / 2**20:.1f} MiB free but the plan writes "
            f"{disk_bytes / 2**20:.1f} MiB of disk blocks there (+ {SLACK_BYTES // 2**20} MiB "
            "slack): free space, pass another offload_dir, or raise the CPU/GPU caps"
        )
