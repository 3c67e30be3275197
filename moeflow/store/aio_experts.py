"""A budgeted cache of experts in RAM over the checkpoint files, read through Linux AIO.

The same store as TieredExperts, without reader threads: a demand miss's reads are submitted
together and reaped by the thread that runs the model; a prefetch's reads are submitted and left
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
from .cached import CachedExperts, SlotSpec
from .extents import ExpertMap, Run
from .reader import ALIGN, FileReader

BOUNCE_BYTES = 16 << 20  # all bounce buffers together; bounds the reads in flight
MAX_SPAN = 64 << 20  # a run larger than this is read by the threaded store instead


def _span(run: Run) -> tuple[int, int]:
    """The aligned file range around a run: (start, length)."""
    start = run.offset & ~(ALIGN - 1)
    return start, (run.offset + run.nbytes - start + ALIGN - 1) & ~(ALIGN - 1)


def usable(reader: FileReader, emap: ExpertMap) -> bool:
    """AIO is asynchronous only for O_DIRECT reads, and each run must fit one bounce buffer."""
    spans = [_span(r)[1] for runs in emap.extents.values() for r in runs]
    return reader.mode == "O_DIRECT" and max(spans) <= MAX_SPAN


class AioExperts(CachedExperts):
    def __init__(self, emap: ExpertMap, spec: SlotSpec, reader: FileReader, pin: bool = False):
        super().__init__(spec, pin=pin)
        self.map, self.reader = emap, reader
        span = max(_span(r)[1] for runs in emap.extents.values() for r in runs)
        n = int(np.clip(BOUNCE_BYTES // span, 4, 64))
        self._maps = [mmap.mmap(-1, span) for _ in range(n)]  # anonymous: page-aligned
        self._bufs = [np.frombuffer(m, dtype=np.uint8) for m in self._maps]
        self._addrs = [self._bufs[i].ctypes.data for i in range(n)]
        self._free_bufs = list(range(n - 1, -1, -1))
        self.q = AioQueue(n)
        self._raw = [s.view(torch.uint8).numpy() for s in self.slots]  # each slot's bytes
        self._tag = 0
        self._reqs: dict[int, tuple[int, Run, int, int]] = {}  # tag -> (key, run, buffer, start)
        self._pending: dict[int, set[int]] = {}  # key -> tags of its reads still in flight
        self._failed: dict[int, Exception] = {}  # key -> why its bytes did not arrive

    @property
    def load_nbytes(self) -> int:
        return self.map.nbytes  # in the disk's dtype

    @property
    def bytes_moved(self) -> int:
        return self.reader.bytes_read

    @property
    def read_mode(self) -> str:
        return "O_DIRECT, Linux AIO"

    # ---- the three ways bytes move

    def _load(self, keys: list[int]) -> None:
        self._submit(keys)
        self._wait(keys)

    def _start(self, key: int) -> None:
        self._submit([key])

    def _start_all(self, keys: list[int]) -> None:
        self._submit(keys)

    def _arrive(self, keys: list[int]) -> None:
        if self._pending:
            self._complete(self.q.reap(0))  # whatever landed meanwhile, without waiting
            if self._pending:
                self._wait(keys)
        if self._failed:
            self._raise(keys)

    def _cancel(self, key: int) -> None:
        # its reads land in bounce buffers, never in the slot: the slot is free now, and the
        # completions only hand their buffers back
        for tag in self._pending.pop(key, ()):
            k, run, buf, start = self._reqs[tag]
            self._reqs[tag] = (-1, run, buf, start)
        self._failed.pop(key, None)

    # ---- submission and completion

    def _submit(self, keys: list[int]) -> None:
        batch = []
        for key in keys:
            layer, e = self.layers[key // self.n_experts], key % self.n_experts
            tags = self._pending.setdefault(key, set())
            for run in self.map.extents[layer, e]:
                if not self._free_bufs:  # every buffer in flight: send what is ready, free one
                    if batch:
                        self.q.submit(batch)
                        batch = []
                    self._complete(self.q.reap(1))
                buf = self._free_bufs.pop()
                start, length = _span(run)
                self._tag += 1
                self._reqs[self._tag] = (key, run, buf, start)
                tags.add(self._tag)
                batch.append((self._tag, self.reader._direct[run.file], self._addrs[buf], length, start))
        if batch:
            self.q.submit(batch)

    def _wait(self, keys: list[int]) -> None:
        while any(k in self._pending for k in keys):
            if not self.q.in_flight:  # (a bookkeeping bug would otherwise wait forever)
                raise RuntimeError("expert reads pending with none in flight")
            self._complete(self.q.reap(1))
        self._raise(keys)

    def _complete(self, done: list[tuple[int, int]]) -> None:
        for tag, res in done:
            key, run, buf, start = self._reqs.pop(tag)
            try:
                if key < 0:
                    continue  # its key left the cache meanwhile
                need = run.offset + run.nbytes - start
                if res < 0:
                    self._failed[key] = OSError(-res, f"reading {run.file.name}: {os.strerror(-res)}")
                elif res < need:
                    got = max(0, res - (run.offset - start))
                    self._failed[key] = CheckpointError(
                        f"{run.file.name} ended early: read {got} of {run.nbytes} bytes at offset "
                        f"{run.offset} (file truncated or replaced while running)"
                    )
                else:
                    self._copy(key, run, self._bufs[buf], run.offset - start)
                    self.reader.bytes_read += run.nbytes
                tags = self._pending[key]
                tags.discard(tag)
                if not tags:
                    del self._pending[key]
            finally:
                self._free_bufs.append(buf)

    def _copy(self, key: int, run: Run, src: np.ndarray, at: int) -> None:
        slot = self.slot_of[key]
        if self.map.dtype == self.dtype:
            raw, size = self._raw[slot], self.dtype.itemsize
            for d, n in run.pieces:
                raw[d * size : d * size + n] = src[at : at + n]
                at += n
        else:  # the disk's dtype converted into the slot's
            dst, size = self.slots[slot], self.map.dtype.itemsize
            for d, n in run.pieces:
                piece = torch.frombuffer(src[at : at + n], dtype=self.map.dtype)
                dst[d : d + n // size].copy_(piece)
                at += n

    def _raise(self, keys: list[int]) -> None:
        for key in keys:
            err = self._failed.pop(key, None)
            if err is not None:
                raise err

    def close(self) -> None:
        self.q.close()
        self.reader.close()
