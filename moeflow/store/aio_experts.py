"""A budgeted cache of experts in RAM over the checkpoint files, read through Linux AIO.

The same store as TieredExperts, without reader threads: a demand miss's reads are submitted
and reaped by the thread that runs the model; a prefetch's reads are submitted and left
in flight while the layer computes, and their completions are reaped (and copied into their slots)
at the next fetch that finds them done, or that needs them. Every read goes through a page-aligned
bounce buffer (O_DIRECT wants aligned file offsets and safetensors' are not), so a slot is never
written by the kernel: a key evicted while its read is still in flight frees its slot at once,
and the late completion only returns its buffer.

Why: on this 2-vCPU machine reader threads take the GIL for the Python around each read, between
the compute thread's ops, and their wake-ups compete with the compute threads for the cores
(BENCHMARKS.md, tiered expert store)."""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from ..errors import CheckpointError
from .aio import AioQueue
from .cached import SlotSpec
from .extents import ExpertMap, Run
from .reader import ALIGN, FileReader
from .tiered import TieredExperts

BOUNCE_BYTES = 64 << 20  # all bounce buffers together: bounds the bytes in flight
CHUNK = 4 << 20  # largest single read; a larger expert is read in several


def _chunks(run: Run, size: int) -> list[tuple[int, int]]:
    """(file offset, length) of the aligned reads of at most `size` bytes that cover a run."""
    start, end = run.offset & ~(ALIGN - 1), (run.offset + run.nbytes + ALIGN - 1) & ~(ALIGN - 1)
    return [(pos, min(size, end - pos)) for pos in range(start, end, size)]


def usable(reader: FileReader, emap: ExpertMap) -> bool:
    """AIO is asynchronous only for O_DIRECT reads; and pieces end on aligned file offsets, which
    must not split an element (safetensors pads its header, so tensors start on one)."""
    size = emap.dtype.itemsize
    aligned = all(r.offset % size == 0 for runs in emap.extents.values() for r in runs)
    return reader.mode == "O_DIRECT" and aligned


class AioExperts(TieredExperts):
    """Demand batches larger than the bounce buffers (a prompt's prefill) still go to the reader
    threads: there the copies out of the bounce buffers, done by the model's thread under AIO,
    would serialise behind the reads (a 16-token prefill of 9.4 MB experts stalled 5.7 s against
    3.7 s with threads), while the threads copy in parallel."""

    def __init__(
        self, emap: ExpertMap, spec: SlotSpec, reader: FileReader, io_threads: int = 4, pin: bool = False
    ):
        super().__init__(emap, spec, io_threads, pin, reader)
        self.q = self._queue(self._buffers(emap))
        self._tag = 0
        self._reqs: dict[int, tuple] = {}  # tag -> (key, run, buffer, file offset, length)
        self._plans: dict[int, list] = {}  # key -> its reads (_reads)
        self._pending: dict[int, set[int]] = {}  # key -> tags of its reads still in flight
        self._failed: dict[int, Exception] = {}  # key -> why its bytes did not arrive

    def _buffers(self, emap: ExpertMap) -> int:
        """Sets up the bounce buffers; returns how many reads may be in flight (one per buffer)."""
        # buffers as large as the largest expert run (aligned), at most CHUNK: small experts take
        # one read each, large ones several, and the bytes in flight stay within BOUNCE_BYTES
        longest = max(r.offset % ALIGN + r.nbytes for runs in emap.extents.values() for r in runs)
        self._size = min(CHUNK, (longest + 2 * ALIGN - 1) & ~(ALIGN - 1))
        n = int(np.clip(BOUNCE_BYTES // self._size, 4, 64))
        self._maps = [mmap.mmap(-1, self._size) for _ in range(n)]  # anonymous: page-aligned
        self._bufs = [np.frombuffer(m, dtype=np.uint8) for m in self._maps]
        self._addrs = [self._bufs[i].ctypes.data for i in range(n)]
        self._free_bufs = list(range(n - 1, -1, -1))
        self._raw = [s.view(torch.uint8).numpy() for s in self.slots]  # each slot's bytes
        return n

    def _queue(self, depth: int) -> AioQueue | None:
        return AioQueue(depth)

    @property
    def read_mode(self) -> str:
        return "O_DIRECT, Linux AIO"

    @property
    def reads_in_flight(self) -> int:
        return self.q.in_flight

    @property
    def queue_depth(self) -> int:
        return self.q.depth

    # ---- the three ways bytes move

    def _load(self, keys: list[int]) -> None:
        self._load_start(keys)
        self._wait(keys)

    def _load_start(self, keys: list[int]) -> None:
        if len(keys) > len(self._maps):
            super()._load(keys)  # the reader threads, done on return (see the class docstring)
        else:
            self._submit(keys)

    def _landing(self, keys: list[int]) -> list[int]:
        if self._pending:
            self._complete(self.q.reap(0))  # whatever landed meanwhile, without waiting
        if self._failed:
            self._raise(keys)
        return [k for k in keys if k in self._pending] if self._pending else []

    def _start(self, key: int) -> None:
        self._submit([key])

    def _start_all(self, keys: list[int]) -> None:
        self._submit(keys)

    def _arrive(self, keys: list[int]) -> None:
        if self._landing(keys):
            self._wait(keys)

    def _cancel(self, key: int) -> None:
        # its reads land in bounce buffers, never in the slot: the slot is free now, and the
        # completions only hand their buffers back
        for tag in self._pending.pop(key, ()):
            self._reqs[tag] = (-1, *self._reqs[tag][1:])
        self._failed.pop(key, None)

    # ---- where a read lands (a store reading into the slots themselves overrides these)

    def _reads(self, key: int) -> list[tuple[Run, int, list[tuple[int, int]]]]:
        """(run, fd, its (file offset, length) pieces) for each run of a key, worked out on the
        key's first load."""
        plan = self._plans.get(key)
        if plan is None:
            runs = self.map.extents[self.layers[key // self.n_experts], key % self.n_experts]
            plan = self._plans[key] = [(r, self.reader._direct[r.file], _chunks(r, self._size)) for r in runs]
        return plan

    def _begin(self, key: int) -> None:
        """The key's reads are about to be submitted."""

    def _target(self, key: int, run: Run, pos: int) -> tuple[int, int]:
        """(buffer, address) the read at file offset `pos` lands in; buffer -1: none to give back."""
        buf = self._free_bufs.pop()
        return buf, self._addrs[buf]

    def _land(self, key: int, run: Run, buf: int, pos: int, lo: int, hi: int) -> None:
        """The run's bytes lo..hi (file offsets), read at `pos` into `buf`, are in: into the slot."""
        self._copy(key, run, self._bufs[buf][lo - pos : hi - pos], lo - run.offset)

    # ---- submission and completion

    def _submit(self, keys: list[int]) -> None:
        batch, depth = [], self.q.depth
        for key in keys:
            self._begin(key)
            for run, fd, pieces in self._reads(key):
                for pos, length in pieces:
                    if len(batch) + self.q.in_flight >= depth:  # all in flight: send what is ready, free one
                        if batch:
                            self._send(batch)
                            batch = []
                        self._complete(self.q.reap(1))
                    buf, addr = self._target(key, run, pos)
                    self._tag += 1
                    self._reqs[self._tag] = (key, run, buf, pos, length)
                    # (re-fetched: the reap above may have completed, and dropped, the key's set)
                    self._pending.setdefault(key, set()).add(self._tag)
                    batch.append((self._tag, fd, addr, length, pos))
        if batch:
            self._send(batch)

    def _send(self, batch: list[tuple[int, int, int, int, int]]) -> None:
        try:
            self.q.submit(batch)
        except OSError as e:  # the reads not taken give their buffers back and fail their keys
            for tag, *_ in batch:
                if tag not in self.q.slot_of:
                    self._finish(tag, e)
            raise

    def _wait(self, keys: list[int]) -> None:
        while any(k in self._pending for k in keys):
            if not self.q.in_flight:  # (a bookkeeping bug would otherwise wait forever)
                raise RuntimeError("expert reads pending with none in flight")
            self._complete(self.q.reap(1))
        self._raise(keys)

    def _complete(self, done: list[tuple[int, int]]) -> None:
        for tag, res in done:
            self._finish(tag, res)

    def _finish(self, tag: int, res: int | Exception) -> None:
        """One read is over (res: bytes read, -errno, or why it never started): its bytes land
        (_land), or its key is marked failed; either way its buffer and tag are released."""
        key, run, buf, pos, length = self._reqs.pop(tag)
        try:
            lo, hi = max(pos, run.offset), min(pos + length, run.offset + run.nbytes)
            if isinstance(res, Exception):
                raise res
            if key < 0:  # its key left the cache meanwhile: the bytes were read all the same
                self.reader.bytes_read += max(0, min(hi, pos + res) - lo)
                return
            if res < 0:
                raise OSError(-res, f"reading {run.file.name}: {os.strerror(-res)}")
            if pos + res < hi:  # (the file's end may cut the aligned read, never the run)
                got = max(0, pos + res - run.offset)
                raise CheckpointError(
                    f"{run.file.name} ended early: read {got} of {run.nbytes} bytes at offset "
                    f"{run.offset} (file truncated or replaced while running)"
                )
            self._land(key, run, buf, pos, lo, hi)
            self.reader.bytes_read += hi - lo
        except Exception as e:  # reported by the fetch that needs this key, not the one reaping
            if key >= 0:
                self._failed.setdefault(key, e)
        finally:
            if buf >= 0:
                self._free_bufs.append(buf)
            tags = self._pending.get(key)
            if tags is not None:
                tags.discard(tag)
                if not tags:
                    del self._pending[key]

    def _copy(self, key: int, run: Run, src: np.ndarray, at: int) -> None:
        """src: the run's bytes from `at` on (relative to the run's start), into their pieces."""
        slot, end = self.slot_of[key], at + len(src)
        raw, disk = self._raw[slot], self.map.dtype.itemsize
        begin = 0  # where the piece starts in the run
        for d, n in run.pieces:
            a, b = max(at, begin), min(end, begin + n)
            if a < b:
                part = src[a - at : b - at]
                if self.map.dtype == self.dtype:
                    off = d * disk + a - begin
                    raw[off : off + b - a] = part
                else:  # the disk's dtype converted into the slot's
                    first = d + (a - begin) // disk
                    self.slots[slot][first : first + (b - a) // disk].copy_(
                        torch.frombuffer(part, dtype=self.map.dtype)
                    )
            begin += n

    def _raise(self, keys: list[int]) -> None:
        for key in keys:
            err = self._failed.pop(key, None)
            if err is not None:
                raise err

    def close(self) -> None:
        if self.q is not None:
            self.q.close()
        super().close()
