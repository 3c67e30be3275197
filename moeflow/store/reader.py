"""Positioned reads of expert bytes from the checkpoint files into reused buffers.

The page cache must not quietly hold the model (the point of a budget is that RAM does not), so
reads bypass it with O_DIRECT. Safetensors offsets are not sector-aligned, so each run is read
as the aligned span around it into a page-aligned per-thread bounce buffer, and its tensors are
copied from there into the slot. That copy is cheap next to what buffered reads cost (the kernel
filling, copying and then dropping page-cache pages): cold 331 KB experts, 8 at a time, took
127-147 µs of CPU each through O_DIRECT against 206-223 µs buffered, and read at 1.1-1.3 against
1.0-1.1 GB/s (bench/bench_reads.py, 2026-11-23). CPU is what reader threads take from the compute
on a 2-core machine.

Where O_DIRECT is refused (tmpfs, some network file systems) reads are buffered and each range
is dropped afterwards with posix_fadvise(POSIX_FADV_DONTNEED). MOEFLOW_KEEP_PAGE_CACHE=1 makes
every read buffered and lets the kernel keep the pages."""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .extents import Run

KEEP_PAGE_CACHE = os.environ.get("MOEFLOW_KEEP_PAGE_CACHE", "0") == "1"
ALIGN = 4096  # satisfies O_DIRECT on 512-byte and 4 KiB sector devices alike
CHUNK = 4 << 20  # largest direct read at once: bounds each thread's bounce buffer


def _open_direct(path: Path) -> int | None:
    if KEEP_PAGE_CACHE or not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:  # EINVAL: this file system has no direct I/O
        return None


class FileReader:
    """Descriptors per file, shared by every reader thread (pread needs no seek lock). All are
    opened up front: a file deleted or replaced while running keeps serving its original bytes
    (the open descriptor holds the inode); one truncated underneath gives a clear error."""

    def __init__(self, files):
        self._fds: dict[Path, int] = {}
        self._direct: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.bytes_read = 0
        try:
            for path in files:
                self._fds[path] = os.open(path, os.O_RDONLY)
                fd = _open_direct(path)
                if fd is not None:
                    self._direct[path] = fd
        except OSError as e:
            self.close()
            raise CheckpointError(
                f"cannot open {Path(e.filename).name} for expert reads: {e.strerror}"
            ) from None

    @property
    def mode(self) -> str:
        """How reads reach the disk, for run reports."""
        if KEEP_PAGE_CACHE:
            return "buffered (page cache kept)"
        if self._direct and len(self._direct) == len(self._fds):
            return "O_DIRECT"
        return "buffered + DONTNEED" if not self._direct else "O_DIRECT (some files buffered + DONTNEED)"

    def read_into(self, runs: list[Run], out: torch.Tensor) -> None:
        """Fills the flat CPU tensor `out` (disk dtype) from the expert's runs."""
        raw = out.view(torch.uint8).numpy()
        itemsize = out.element_size()
        for x in runs:
            direct = self._direct.get(x.file)
            if direct is not None:
                self._read_direct(direct, x, raw, itemsize)
            else:
                self._read_buffered(self._fds[x.file], x, raw, itemsize)
            with self._lock:
                self.bytes_read += x.nbytes

    def _read_buffered(self, fd: int, x: Run, raw: np.ndarray, itemsize: int) -> None:
        views = [memoryview(raw)[d * itemsize : d * itemsize + n] for d, n in x.pieces]
        got = os.preadv(fd, views, x.offset)
        if got != x.nbytes:
            _ended(x, got)
        if not KEEP_PAGE_CACHE:
            os.posix_fadvise(fd, x.offset, x.nbytes, os.POSIX_FADV_DONTNEED)

    def _read_direct(self, fd: int, x: Run, raw: np.ndarray, itemsize: int) -> None:
        """The aligned span around the run, at most CHUNK per read, through the bounce buffer,
        then copied into the run's pieces in file order."""
        buf, view = self._bounce()
        pieces = [(d * itemsize, n) for d, n in x.pieces]
        i, filled = 0, 0  # the piece being filled, and its bytes so far
        pos, end = x.offset, x.offset + x.nbytes  # file bytes still to deliver: [pos, end)
        while pos < end:
            start = pos & ~(ALIGN - 1)
            span = min(CHUNK, (end - start + ALIGN - 1) & ~(ALIGN - 1))
            have = min(start + os.preadv(fd, [view[:span]], start), end) - pos
            if have <= 0:
                _ended(x, pos - x.offset)
            src = pos - start
            while have:
                d, n = pieces[i]
                k = min(have, n - filled)
                raw[d + filled : d + filled + k] = buf[src : src + k]
                src, have, pos, filled = src + k, have - k, pos + k, filled + k
                if filled == n:
                    i, filled = i + 1, 0

    def _bounce(self) -> tuple[np.ndarray, memoryview]:
        b = getattr(self._local, "bounce", None)
        if b is None:  # anonymous mmap: page-aligned, as O_DIRECT needs
            m = mmap.mmap(-1, CHUNK)
            b = self._local.bounce = (np.frombuffer(m, dtype=np.uint8), memoryview(m))
        return b

    def close(self) -> None:
        with self._lock:
            for fd in (*self._fds.values(), *self._direct.values()):
                os.close(fd)
            self._fds.clear()
            self._direct.clear()


def _ended(x: Run, got: int) -> None:
    raise CheckpointError(
        f"{x.file.name} ended early: read {got} of {x.nbytes} bytes at offset {x.offset} "
        "(file truncated or replaced while running)"
    )
