"""Offload stores and the streamer, on the CPU: packing, the disk folder, slot reuse and prediction."""

from __future__ import annotations

import json

import pytest
import torch

from shardq.runtime.offload import ALIGN, OffloadError, Streamer, host_buffer, layout, open_disk_block, pack_host_block, \
    read_block_into, read_disk_index, views, write_disk_offload

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool,
          torch.float64]


def random_tensors(seed: int, n: int = 7) -> dict[str, torch.Tensor]:
    """Tensors of mixed dtypes and odd shapes (0-dim and empty included) with random values and outliers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        dtype = DTYPES[(seed + i) % len(DTYPES)]
        shape = [(3, 5), (17,), (), (2, 3, 7), (0, 4), (129,), (1, 1)][i % 7]
        x = torch.randn(shape, generator=g) * 10
        if x.numel():
            x.view(-1)[0] = 1e4  # an outlier
        if dtype == torch.bool:
            out[f"m{i}.t"] = x > 0
        else:
            out[f"m{i}.t"] = x.to(dtype) if dtype.is_floating_point else x.clamp(-100, 100).to(dtype)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_pack_and_views_roundtrip(seed):
    tensors = random_tensors(seed)
    block = pack_host_block("b", tensors, pin=False)
    specs, total = layout(tensors)
    assert block.nbytes >= total and all(s.offset % ALIGN == 0 for s in specs)
    for (name, want), got in zip(tensors.items(), views(block.buffer, block.specs)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), name


@pytest.mark.parametrize("seed", range(3))
def test_disk_block_roundtrip_and_index(tmp_path, seed):
    tensors = random_tensors(seed)
    write_disk_offload(tmp_path, "model.layers.3", tensors)
    write_disk_offload(tmp_path, "", {"w": torch.randn(4)})
    index = read_disk_index(tmp_path)
    assert set(index["blocks"]) == {"model.layers.3", ""}
    block = open_disk_block(tmp_path, "model.layers.3")
    buf = torch.empty(block.nbytes, dtype=torch.uint8)
    read_block_into(block, buf)
    got = dict(zip((s.name for s in block.specs), views(buf, block.specs)))
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_disk_errors_name_the_problem(tmp_path):
    with pytest.raises(OffloadError, match="no index.json"):
        read_disk_index(tmp_path)
    write_disk_offload(tmp_path, "blk", {"w": torch.randn(64, 64)})
    with pytest.raises(OffloadError, match="not in"):
        open_disk_block(tmp_path, "other")
    path = tmp_path / "blk.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(OffloadError, match="truncated"):
        open_disk_block(tmp_path, "blk")
    path.write_bytes(data)
    block = open_disk_block(tmp_path, "blk")
    path.write_bytes(data[: len(data) - 100])  # truncated after the header was checked: the read notices
    with pytest.raises(OffloadError, match="truncated"):
        read_block_into(block, torch.empty(block.nbytes, dtype=torch.uint8))
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(OffloadError, match="not a shardq offload index"):
        read_disk_index(tmp_path)
    with pytest.raises(OffloadError, match="meta device"):
        write_disk_offload(tmp_path, "m", {"w": torch.empty(3, device="meta")})


def _streamer(tmp_path, n: int = 5, prefetch: bool = True) -> tuple[Streamer, dict[str, dict[str, torch.Tensor]]]:
    """Blocks of different sizes, alternating host and disk stores."""
    st = Streamer(torch.device("cpu"), prefetch)
    contents = {}
    for i in range(n):
        tensors = {"w": torch.randn(8 + 4 * i, 16), "q": torch.randint(-128, 127, (3 * i + 1,), dtype=torch.int8)}
        name = f"b{i}"
        contents[name] = tensors
        if i % 2:
            write_disk_offload(tmp_path, name, tensors)
            st.add(open_disk_block(tmp_path, name))
        else:
            st.add(pack_host_block(name, tensors, pin=False))
    st.allocate()
    return st, contents


def _check(st: Streamer, name: str, contents: dict, slow_compute: bool = False) -> None:
    """Acquire, compare, release; `slow_compute`: the block's compute outlasts the disk read-ahead it started
    (the regime prefetching is for), so counts of prefetches do not depend on thread timing."""
    got = st.acquire(name)
    specs = st.blocks[name].specs
    for spec, t in zip(specs, got):
        assert torch.equal(t, contents[name][spec.name]), (name, spec.name)
    if slow_compute:
        for future, _ in list(st._reads.values()):
            future.result()
    st.release(name)


@pytest.mark.parametrize("prefetch", [True, False])
def test_streamer_serves_any_order_with_two_slots(tmp_path, prefetch):
    st, contents = _streamer(tmp_path, prefetch=prefetch)
    assert len(st.slots) == 2 and all(s.buffer.numel() >= st.slot_bytes() for s in st.slots)
    order = [f"b{i}" for i in range(5)]
    for _ in range(3):  # repeated sequential passes (tokens)
        for name in order:
            _check(st, name, contents)
    g = torch.Generator().manual_seed(0)
    for i in torch.randint(0, 5, (25,), generator=g).tolist():  # mispredicted orders stay correct
        _check(st, f"b{i}", contents)
    st.close()
    if prefetch:
        assert st.stats["prefetched"] > 0 and st.stats["disk_reads"] > 0
    else:
        assert st.stats["prefetched"] == 0


def test_streamer_learns_the_call_order(tmp_path):
    st, contents = _streamer(tmp_path)
    order = ["b4", "b1", "b3", "b0", "b2"]
    for _ in range(2):
        for name in order:
            _check(st, name, contents, slow_compute=True)
    assert [st.predict(n) for n in order] == order[1:] + order[:1]
    before = st.stats["copies"]
    for name in order:
        _check(st, name, contents, slow_compute=True)
    # every block of the third pass was already in a slot when asked for: all its copies were prefetches
    assert st.stats["copies"] - before == len(order)
    assert st.stats["prefetched"] >= 2 * len(order)
    st.close()


def test_streamer_refuses_a_third_concurrent_block(tmp_path):
    st, _ = _streamer(tmp_path, n=3)
    st.acquire("b0")
    st.acquire("b1")
    with pytest.raises(RuntimeError, match="both streaming slots"):
        st.acquire("b2")
    st.close()


def test_pinnable_host_buffer_is_exact_and_owned_by_its_views():
    import gc
    import weakref

    buf, owner = host_buffer(123457, pin=True)
    assert buf.numel() == 123457 and buf.data_ptr() % 4096 == 0  # page-aligned, no rounding
    alive = weakref.ref(owner)
    view = buf[1000:2000]
    view.fill_(7)
    del buf, owner
    gc.collect()
    assert alive() is not None and int(view.sum()) == 7000  # the memory lives while a view does
    del view
    gc.collect()
    assert alive() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_block_is_registered_exactly_and_copies_correctly():
    tensors = random_tensors(5)
    block = pack_host_block("b", tensors, pin=True)
    assert block.buffer.is_pinned()
    gpu = torch.empty(block.nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        gpu.copy_(block.buffer, non_blocking=True)
    stream.synchronize()
    for (name, want), got in zip(tensors.items(), views(gpu, block.specs)):
        assert torch.equal(got.cpu(), want), name
