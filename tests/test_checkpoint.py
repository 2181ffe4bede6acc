"""Safetensors header index: single files, sharded directories, truncation and inconsistency errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shardq.checkpoint import index as checkpoint
from shardq.checkpoint.index import CheckpointError, index_checkpoint, read_header, read_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int64, torch.bool,
          torch.float64, torch.int32]


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    shapes = [(7, 5), (3,), (2, 3, 4), (1,), (0, 4), (), (17, 33)]
    for i, dtype in enumerate(DTYPES):
        shape = shapes[i % len(shapes)]
        x = torch.randn(shape, generator=g) * 50
        out[f"block.{i}.w"] = (x > 0) if dtype == torch.bool else x.to(dtype)
    return out


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_single_file_header_matches_safe_open(tmp_path):
    ts = _tensors()
    f = tmp_path / "model.safetensors"
    save_file(ts, f, metadata={"format": "pt"})
    idx = index_checkpoint(tmp_path)
    assert idx.files == [str(f)] and idx.metadata == {"format": "pt"}
    assert set(idx.tensors) == set(ts)
    with safe_open(str(f), "pt") as so:
        for name, t in ts.items():
            info = idx[name]
            assert info.dtype == t.dtype and info.shape == tuple(t.shape) and info.nbytes == t.numel() * t.element_size()
            assert _equal(read_tensor(info), so.get_tensor(name))
            assert _equal(read_tensor(info), t)
    assert idx.total_bytes == sum(t.numel() * t.element_size() for t in ts.values())
    assert index_checkpoint(f).tensors == idx.tensors  # a file path works too


def test_sharded_directory(tmp_path):
    ts = _tensors(1)
    names = sorted(ts)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: ts[n] for n in part}, tmp_path / fname)
        weight_map.update({n: fname for n in part})
    (tmp_path / checkpoint.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    idx = index_checkpoint(tmp_path)
    assert len(idx) == len(ts) and len(idx.files) == 2
    for name, t in ts.items():
        assert idx[name].file.endswith(weight_map[name])
        assert _equal(read_tensor(idx[name]), t)


def test_unindexed_directory_of_several_files(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "y.safetensors")
    assert set(index_checkpoint(tmp_path).tensors) == {"a", "b"}
    save_file({"a": torch.ones(2)}, tmp_path / "z.safetensors")
    with pytest.raises(CheckpointError, match="'a' is in both"):
        index_checkpoint(tmp_path)


def test_headers_only_are_read(tmp_path, checkpoint_reads):
    big = {"w": torch.randn(512, 1024), "v": torch.randn(256)}
    save_file(big, tmp_path / "model.safetensors")
    reads = checkpoint_reads
    idx = index_checkpoint(tmp_path)
    assert sum(reads) < 1024 and idx["w"].nbytes == 512 * 1024 * 4


def test_read_tensor_moves_to_device(tmp_path):
    save_file({"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}, tmp_path / "model.safetensors")
    t = read_tensor(index_checkpoint(tmp_path)["w"], device="meta")
    assert t.is_meta and t.shape == (2, 3)


def test_truncated_file_names_file_and_tensor(tmp_path):
    ts = {"first": torch.randn(10), "second": torch.randn(1000)}
    f = tmp_path / "model.safetensors"
    save_file(ts, f)
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated: tensor '(first|second)'"):
        index_checkpoint(tmp_path)


@pytest.mark.parametrize("payload,match", [
    (b"", "too short"), (b"\x01\x02", "too short"), (struct.pack("<Q", 10**12) + b"{}", "header length"),
    (struct.pack("<Q", 5) + b"nope!", "not valid JSON"), (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_corrupt_headers(tmp_path, payload, match):
    f = tmp_path / "model.safetensors"
    f.write_bytes(payload)
    with pytest.raises(CheckpointError, match=match):
        read_header(f)


def _raw_file(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "F32", "shape": [2]}, "lacks"),
    ({"dtype": "C64", "shape": [2], "data_offsets": [0, 8]}, "dtype 'C64'"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12"),
])
def test_bad_entries(tmp_path, entry, match):
    f = tmp_path / "m.safetensors"
    _raw_file(f, {"t": entry}, b"\0" * 16)
    with pytest.raises(CheckpointError, match=match):
        read_header(f)


def test_index_missing_shard_and_missing_tensor(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    idx_file = tmp_path / checkpoint.INDEX_NAME
    idx_file.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"missing shard.*s2.safetensors"):
        index_checkpoint(tmp_path)
    idx_file.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "zz": "s1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"tensor 'zz' is in s1.safetensors"):
        index_checkpoint(tmp_path)
    idx_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid index"):
        index_checkpoint(tmp_path)


def test_no_safetensors_and_missing_paths(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never pickle"):
        index_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        index_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_header(tmp_path / "nope.safetensors")


def test_read_tensor_detects_file_shrunk_after_indexing(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(100)}, f)
    info = index_checkpoint(tmp_path)["w"]
    f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="truncated"):
        read_tensor(info)


def test_dtype_counts(tmp_path):
    save_file({"a": torch.ones(4, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float32)},
              tmp_path / "model.safetensors")
    assert index_checkpoint(tmp_path).dtype_counts() == {torch.float16: 8, torch.float32: 8}
