"""Positioned reads of expert bytes from the checkpoint files into reused buffers.

The page cache must not quietly hold the model (the point of a budget is that RAM does not), so
after each read the range is dropped with posix_fadvise(POSIX_FADV_DONTNEED): reads come from the
disk every time, like O_DIRECT, without O_DIRECT's alignment rules (safetensors offsets are not
sector-aligned). Set MOEFLOW_KEEP_PAGE_CACHE=1 to let the kernel cache them instead."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..errors import CheckpointError
from .extents import Run

DROP_CACHE = os.environ.get("MOEFLOW_KEEP_PAGE_CACHE", "0") != "1" and hasattr(os, "posix_fadvise")


class FileReader:
    """One descriptor per file, shared by every reader thread (pread needs no seek lock). All are
    opened up front: a file deleted or replaced while running keeps serving its original bytes
    (the open descriptor holds the inode); one truncated underneath gives a clear error."""

    def __init__(self, files):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        try:
            for path in files:
                self._fds[path] = os.open(path, os.O_RDONLY)
        except OSError as e:
            self.close()
            raise CheckpointError(
                f"cannot open {Path(e.filename).name} for expert reads: {e.strerror}"
            ) from None

    def _fd(self, path: Path) -> int:
        return self._fds[path]

    def read_into(self, runs: list[Run], out: torch.Tensor) -> None:
        """Fills the flat CPU tensor `out` (disk dtype) from the expert's runs."""
        raw = memoryview(out.view(torch.uint8).numpy())
        itemsize = out.element_size()
        for x in runs:
            fd = self._fd(x.file)
            views = [raw[dst * itemsize : dst * itemsize + n] for dst, n in x.pieces]
            got = os.preadv(fd, views, x.offset)
            if got != x.nbytes:
                raise CheckpointError(
                    f"{x.file.name} ended early: read {got} of {x.nbytes} bytes at offset {x.offset} "
                    "(file truncated or replaced while running)"
                )
            if DROP_CACHE:
                os.posix_fadvise(fd, x.offset, x.nbytes, os.POSIX_FADV_DONTNEED)
            with self._lock:
                self.bytes_read += x.nbytes

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
