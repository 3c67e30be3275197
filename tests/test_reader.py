"""The expert reader's byte paths (O_DIRECT through an aligned bounce buffer, and buffered) give
exactly the file's bytes for runs at any alignment, split into chunks, and refuse short files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.errors import CheckpointError
from moeflow.store import reader as reader_mod
from moeflow.store.extents import Extent, coalesce
from moeflow.store.reader import FileReader


@pytest.fixture
def blob(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    return path, data


def _runs(path, offset: int, sizes: list[int], order: list[int]):
    """Back-to-back tensors of `sizes` bytes from `offset`, placed in the slot in `order`."""
    slot_at = np.cumsum([0] + [sizes[i] for i in order])
    dst = {i: int(slot_at[k]) for k, i in enumerate(order)}
    ext, pos = [], offset
    for i, n in enumerate(sizes):
        ext.append(Extent(path, pos, n, dst[i] // 4))
        pos += n
    return coalesce(ext), dst


@pytest.mark.parametrize("chunk", [8192, 4 << 20])
@pytest.mark.parametrize("offset", [0, 4096, 8, 12_348])
@pytest.mark.parametrize("direct", [True, False])
def test_reads_give_the_files_bytes(blob, monkeypatch, chunk, offset, direct):
    path, data = blob
    monkeypatch.setattr(reader_mod, "CHUNK", chunk)
    sizes, order = [40_000, 20_004, 30_000], [1, 2, 0]  # disk order differs from slot order
    runs, dst = _runs(path, offset, sizes, order)
    assert len(runs) == 1  # contiguous tensors: one read
    r = FileReader([path])
    if not direct:
        r._direct.clear()
    elif r.mode != "O_DIRECT":
        pytest.skip("this file system refuses O_DIRECT")
    out = torch.zeros(sum(sizes) // 4, dtype=torch.float32)
    r.read_into(runs, out)
    got = out.view(torch.uint8).numpy()
    pos = offset
    for i, n in enumerate(sizes):
        assert np.array_equal(got[dst[i] : dst[i] + n], data[pos : pos + n])
        pos += n
    assert r.bytes_read == sum(sizes)
    r.close()


@pytest.mark.parametrize("direct", [True, False])
def test_short_file_is_an_error(blob, direct):
    path, data = blob
    runs, _ = _runs(path, len(data) - 1000, [4000], [0])
    r = FileReader([path])
    if not direct:
        r._direct.clear()
    with pytest.raises(CheckpointError, match="ended early"):
        r.read_into(runs, torch.zeros(1000, dtype=torch.float32))
    r.close()


@pytest.mark.parametrize("helper", [True, False], ids=["native helper", "ctypes"])
def test_aio_queue_reads_the_files_bytes_and_reports_short_reads(blob, helper):
    """Linux AIO through raw system calls (the native helper's, or ctypes'): batched O_DIRECT
    reads land the file's bytes, a read past the end comes back short, a refused submission
    frees its control blocks, and every block is free again afterwards."""
    import mmap
    import os

    from moeflow.store import aio

    if not aio.available():
        pytest.skip("no Linux AIO here")
    path, data = blob
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("this file system has no O_DIRECT")
    q = aio.AioQueue(4)
    if helper and q.lib is None:
        pytest.skip("no C compiler")
    if not helper:
        q.lib = None
    bufs = [mmap.mmap(-1, 65536) for _ in range(3)]
    addr = [np.frombuffer(b, dtype=np.uint8).ctypes.data for b in bufs]
    try:
        offsets = [0, 4096 * 7, 4096 * 70]  # the last one runs past the 300,000-byte file
        q.submit([(10 + i, fd, addr[i], 65536, off) for i, off in enumerate(offsets)])
        done = {}
        while len(done) < 3:
            done.update(q.reap(1))
        assert q.in_flight == 0 and len(q.free) == 4
        for i, off in enumerate(offsets):
            want = data[off : off + 65536]
            assert done[10 + i] == len(want)
            assert np.array_equal(np.frombuffer(bufs[i], dtype=np.uint8)[: len(want)], want)
        with pytest.raises(ValueError, match="free control blocks"):
            q.submit([(i, fd, addr[0], 4096, 0) for i in range(5)])
        closed = os.open(path, os.O_RDONLY)
        os.close(closed)  # a descriptor number no longer open: io_submit refuses it
        with pytest.raises(OSError, match="io_submit: Bad file descriptor"):
            q.submit([(1, fd, addr[0], 4096, 0), (2, closed, addr[1], 4096, 0)])
        assert q.in_flight == 1 and len(q.free) == 3  # the first went in; the second's block is free
        assert q.reap(1) == [(1, 4096)] and len(q.free) == 4
    finally:
        q.close()
        os.close(fd)
