"""Checkpoints are a trust boundary: headers are checked at least as strictly as the safetensors library checks
them (differentially, on hand-made and randomly mutated headers), every refusal names the file and the tensor, and
model.safetensors.index.json may only name files inside the checkpoint folder."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _f_models import save_checkpoint  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from shardq.checkpoint.index import CheckpointError, index_checkpoint, read_header  # noqa: E402
from shardq.hf import meta_model_from_dir  # noqa: E402
from shardq.loading.loader import load_sharded  # noqa: E402


def raw_file(path: Path, header: str | dict, data: bytes) -> Path:
    h = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_slice(k)
        return True
    except Exception:  # noqa: BLE001  (any refusal of the library counts)
        return False


def shardq_accepts(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except CheckpointError:
        return False


T = '"dtype":"F32","shape":[2],"data_offsets":'
CASES = {  # name: (header JSON text, data length); what the library does with each is asserted below
    "ok": ('{"a":{%s[0,8]},"b":{%s[8,16]}}' % (T, T), 16),
    "unsorted_ok": ('{"b":{%s[8,16]},"a":{%s[0,8]}}' % (T, T), 16),
    "gap": ('{"a":{%s[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}' % T, 16),
    "overlap": ('{"a":{%s[0,8]},"b":{%s[4,12]}}' % (T, T), 16),
    "same_bytes": ('{"a":{%s[0,8]},"b":{%s[0,8]}}' % (T, T), 8),
    "trailing_bytes": ('{"a":{%s[0,8]}}' % T, 16),
    "negative_offset": ('{"a":{%s[-8,0]},"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}' % T, 16),
    "float_shape": ('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8),
    "negative_shape": ('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', 8),
    "bool_shape": ('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', 4),
    "string_offsets": ('{"a":{"dtype":"F32","shape":[4],"data_offsets":["0","16"]}}', 16),
    "three_offsets": ('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16,16]}}', 16),
    "huge_offset": ('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551616]}}', 16),
    "overflowing_shape": ('{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,16]}}', 16),
    "metadata_list": ('{"__metadata__":[1],"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', 16),
    "metadata_int_value": ('{"__metadata__":{"x":1},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', 16),
    "metadata_null": ('{"__metadata__":null,"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', 16),
    "dtype_mismatch": ('{"a":{"dtype":"F16","shape":[4],"data_offsets":[0,16]}}', 16),
    "lowercase_dtype": ('{"a":{"dtype":"f32","shape":[4],"data_offsets":[0,16]}}', 16),
    "not_an_object": ('[1]', 0),
    "empty_but_data": ('{}', 16),
    "empty": ('{}', 0),
    "extra_field": ('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"extra":1}}', 16),
    "leading_space": (' {"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', 16),
    "trailing_nul": ('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}\x00', 16),
    "zero_size": ('{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"F32","shape":[4],'
                  '"data_offsets":[0,16]}}', 16),
    "scalar": ('{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', 4),
    "duplicate_field": ('{"a":{"dtype":"F32","shape":[4],"shape":[4],"data_offsets":[0,16]}}', 16),
}
STRICTER = {  # refused by shardq, accepted by the library: a duplicate key is kept silently by its JSON parser
    "duplicate_metadata_key": ('{"__metadata__":{"x":"1","x":"2"},"a":{"dtype":"F32","shape":[4],'
                               '"data_offsets":[0,16]}}', 16),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_verdict_as_the_safetensors_library(tmp_path, name):
    header, n = CASES[name]
    f = raw_file(tmp_path / "m.safetensors", header, bytes(range(n)) if n < 256 else b"\1" * n)
    assert shardq_accepts(f) == library_accepts(f), name


@pytest.mark.parametrize("name", sorted(STRICTER))
def test_duplicate_keys_are_refused(tmp_path, name):
    header, n = STRICTER[name]
    f = raw_file(tmp_path / "m.safetensors", header, b"\0" * n)
    assert library_accepts(f)  # the library keeps one of the two silently
    with pytest.raises(CheckpointError, match="appears twice"):
        read_header(f)
    dup = raw_file(tmp_path / "d.safetensors", '{"a":{%s[0,8]},"a":{%s[8,16]}}' % (T, T), b"\0" * 16)
    with pytest.raises(CheckpointError, match="'a' appears twice"):
        read_header(dup)


def _mutate(rng: random.Random, header: dict, data: bytes) -> tuple[str, bytes]:
    """One random corruption of a valid header (or none), as JSON text and data bytes."""
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    e = h[rng.choice(names)]
    kind = rng.randrange(14)
    if kind == 0:
        e["data_offsets"][rng.randrange(2)] += rng.choice([-9, -4, -1, 1, 4, 8, 100])
    elif kind == 1:
        e["shape"] = [rng.choice([2.0, -1, True, "3", None, 2**70])] + e["shape"][1:]
    elif kind == 2:
        e.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif kind == 3:
        e["dtype"] = rng.choice(["F16", "I8", "U8", "F64", "f32", "C64", 5, "BF16", "I64"])
    elif kind == 4:
        h["__metadata__"] = rng.choice([[1], {"a": 1}, None, {"a": "b"}, "x", {"a": None}])
    elif kind == 5:
        data = data + b"\0" * rng.choice([1, 4, 8])
    elif kind == 6:
        data = data[: rng.randrange(len(data))]
    elif kind == 7:
        e["data_offsets"] = rng.choice([[0], [0, 0, 0], "0,8", [-1, 7], [0.0, 8]])
    elif kind == 8:
        a, b = rng.sample(names, 2)
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    elif kind == 9:
        e["shape"] = e["shape"] + [rng.choice([1, 2, 0])]
    elif kind == 10:
        e["extra"] = rng.choice([1, "x", [1]])
    elif kind == 11:
        return json.dumps(h) + rng.choice([" ", "   ", "\n"]), data
    elif kind == 12:
        return " " + json.dumps(h), data
    return json.dumps(h), data


def test_random_mutations_match_the_library(tmp_path):
    rng = random.Random(0)
    verdicts = {True: 0, False: 0}
    for i in range(300):
        tensors = {f"t{j}": torch.randn(rng.choice([(3,), (2, 2), (5, 1), (4,)])).to(
            rng.choice([torch.float32, torch.float16, torch.int8])) for j in range(3)}
        clean = tmp_path / f"c{i}.safetensors"
        save_file(tensors, str(clean), metadata={"format": "pt"})
        raw = clean.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        text, data = _mutate(rng, header, raw[8 + n:])
        f = raw_file(tmp_path / f"m{i}.safetensors", text, data)
        lib, ours = library_accepts(f), shardq_accepts(f)
        assert ours == lib, (text, len(data), lib, ours)
        verdicts[lib] += 1
        if ours:  # what both accept reads the same values
            got, _ = read_header(f)
            with safe_open(str(f), "pt") as sf:
                for k, info in got.items():
                    from shardq.checkpoint.index import read_tensor
                    assert torch.equal(read_tensor(info), sf.get_tensor(k)), k
    assert verdicts[True] > 30 and verdicts[False] > 100  # both sides exercised


def test_header_size_bounds(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(struct.pack("<Q", 100_000_001) + b"{}" + b" " * 64)
    with pytest.raises(CheckpointError, match="header length"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 0))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(f)


@pytest.mark.parametrize("header,match", [
    ('{"a":{%s[0,8]},"b":{%s[4,12]}}' % (T, T), r"tensor 'b' begins at byte 4 but tensor 'a' ends at 8.*overlaps"),
    ('{"a":{%s[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}' % T, "'b'.*gap"),
    ('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', r"tensor 'a' has shape \[2.0\]"),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}', r"tensor 'a' has data_offsets \[-8, 0\]"),
    ('{"__metadata__":{"x":1},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', "__metadata__ must be"),
])
def test_errors_name_file_and_tensor(tmp_path, header, match):
    f = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match=match) as e:
        read_header(f)
    assert "bad.safetensors" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# a crafted checkpoint never loads something wrong


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_checkpoint("llama", tmp_path_factory.mktemp("ck") / "llama", dtype=torch.float32, layers=2, vocab=64)


def _rewrite_header(src: Path, dst: Path, edit) -> Path:
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    dst.mkdir()
    (dst / "config.json").write_text((src.parent / "config.json").read_text())
    return raw_file(dst / "model.safetensors", header, raw[8 + n:]).parent


def test_overlapping_offsets_never_load_another_tensors_bytes(llama, tmp_path):
    def alias(h):  # up_proj reads gate_proj's bytes (same shape): the library refuses, so must shardq
        h["model.layers.0.mlp.up_proj.weight"]["data_offsets"] = h["model.layers.0.mlp.gate_proj.weight"]["data_offsets"]
    bad = _rewrite_header(llama / "model.safetensors", tmp_path / "bad", alias)
    assert not library_accepts(bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.0.mlp"):
        load_sharded(meta_model_from_dir(bad), bad, max_memory={"cpu": "1GB"}, progress=False)


def test_negative_offset_never_reads_the_header(llama, tmp_path):
    def into_header(h):
        name = "model.norm.weight"
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b - 10**4, e - 10**4]
    bad = _rewrite_header(llama / "model.safetensors", tmp_path / "bad", into_header)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_sharded(meta_model_from_dir(bad), bad, max_memory={"cpu": "1GB"}, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# the index may only name files inside the checkpoint folder


def _sharded(root: Path, weight_map: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.mark.parametrize("target", ["../other/model.safetensors", "ABS", "../../etc/passwd", "sub/../../x.safetensors"])
def test_index_paths_outside_the_folder_are_refused(tmp_path, target, checkpoint_reads):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"a": torch.ones(2)}, other / "model.safetensors")
    name = str(other / "model.safetensors") if target == "ABS" else target
    ck = _sharded(tmp_path / "ck", {"a": name})
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        index_checkpoint(ck)
    assert checkpoint_reads == []  # refused before any byte of the named file was read


def test_index_symlink_escape_is_refused_but_the_hf_cache_layout_loads(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"a": torch.ones(2)}, other / "secret.safetensors")
    ck = _sharded(tmp_path / "ck", {"a": "model-1.safetensors"})
    (ck / "model-1.safetensors").symlink_to(other / "secret.safetensors")
    with pytest.raises(CheckpointError, match="symlink leading out"):
        index_checkpoint(ck)
    repo = tmp_path / "models--x--y"  # huggingface_hub: snapshots/<rev>/<file> -> ../../blobs/<hash>
    (repo / "blobs").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, repo / "blobs" / "abc123")
    snap = _sharded(repo / "snapshots" / "rev1", {"a": "model-1.safetensors"})
    (snap / "model-1.safetensors").symlink_to(Path("../../blobs/abc123"))
    assert list(index_checkpoint(snap).tensors) == ["a"]


@pytest.mark.parametrize("index,match", [
    ({"weight_map": ["a"]}, "weight_map' object"),
    ({"weight_map": {"a": 3}}, "'a' -> 3 is not a file name"),
    ({"weight_map": {"a": None}}, "is not a file name"),
    ([1], "weight_map' object"),
])
def test_weight_map_must_be_a_dict_of_strings(tmp_path, index, match):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        index_checkpoint(ck)


def test_duplicate_keys_in_the_index_are_refused(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({"a": torch.ones(2)}, ck / "s1.safetensors")
    save_file({"a": torch.zeros(2)}, ck / "s2.safetensors")
    (ck / "model.safetensors.index.json").write_text('{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}')
    with pytest.raises(CheckpointError, match="'a' appears twice"):
        index_checkpoint(ck)
