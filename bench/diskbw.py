"""Disk read-bandwidth probe, for the expert store's figures to be read against.

Two numbers, both cold (nothing served from the page cache):
- direct: O_DIRECT reads of 8 MiB aligned blocks, `threads` readers at once: what the device gives;
- dropped: buffered reads of the same blocks, each range dropped from the page cache with
  posix_fadvise(DONTNEED) before and after: how the tiered store itself reads (safetensors
  offsets are not sector-aligned, so it cannot use O_DIRECT).
The probe reads the files it is given (the checkpoint's own files: same disk, same layout).

    python bench/diskbw.py FILE [FILE ...] [--gib 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK = 8 << 20
_local = threading.local()


def _blocks(files: list[Path], total: int) -> list[tuple[Path, int]]:
    """Up to `total` bytes of 8 MiB blocks spread evenly over the files."""
    out = []
    for f in files:
        out += [(f, off) for off in range(0, f.stat().st_size - BLOCK, BLOCK)]
    step = max(1, len(out) // max(1, total // BLOCK))
    return out[::step][: total // BLOCK]


def probe(files: list[str | Path], gib: float = 2.0, threads: int = 1, direct: bool = True) -> float:
    """GB/s (1e9 B/s) reading ~gib GiB of the files' blocks cold."""
    blocks = _blocks([Path(f) for f in files], int(gib * 2**30))
    if not blocks:
        raise ValueError("files too small to probe")
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {f: os.open(f, flags) for f in {b[0] for b in blocks}}
    for fd in fds.values():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(block: tuple[Path, int]) -> int:
        buf = getattr(_local, "buf", None)
        if buf is None:
            buf = _local.buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
        fd = fds[block[0]]
        n = os.preadv(fd, [buf], block[1])
        if not direct:
            os.posix_fadvise(fd, block[1], BLOCK, os.POSIX_FADV_DONTNEED)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = sum(pool.map(read, blocks))
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return got / dt / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    for direct in (True, False):
        gbs = probe(a.files, a.gib, a.threads, direct)
        print(f"{'O_DIRECT' if direct else 'buffered+DONTNEED'} x{a.threads}: {gbs:.2f} GB/s")


if __name__ == "__main__":
    main()
