"""Expert reads straight into their cache slots: O_DIRECT through Linux AIO, with no bounce copy.

Where every expert of a checkpoint is one contiguous run in the slots' dtype, its matrices
64-byte aligned in the file (DATA_ALIGN), with gate and up adjacent and in that order
(safetensors files written per expert are: down, gate, up back to back), each slot is a
page-aligned buffer one page longer than an expert and the aligned span around the run is read
into it as it lies on disk. The expert's two matrices are then views at the run's offset within
its first page, made when the read is submitted (and kept per slot and offset, since few offsets
recur). What this saves is the copy out of a bounce buffer: 18-26 µs per 166 KB expert on the
model's own thread, between its kernels (ad-hoc timings of a bf16 E32 K8 decode; BENCHMARKS.md).

The price: the kernel writes the slot itself, so an expert evicted while its read is in flight
holds its slot until the read lands (rare: a policy evicts the experts it expects to need last,
and a read in flight is for the layer about to run). The extra page per slot (about 2.5% of a
166 KB expert) is overhead outside the budget, like the bounce buffers it replaces."""

from __future__ import annotations

import mmap
import os

import torch

from ..errors import CheckpointError
from . import aio_experts
from .aio_experts import AioExperts
from .cached import SlotSpec
from .extents import ExpertMap
from .reader import ALIGN, FileReader

DEPTH = 64  # reads in flight at most (a prefill's demand batch goes in waves of this many)
# a matrix must sit in its slot as aligned as in a resident tensor: BLAS picks kernels, and so
# rounding, by pointer alignment (a fp32 test model's logits moved by 1.3e-6 with 4-byte-aligned
# views). O_DIRECT puts the run at its file offset modulo 512, so only files whose expert
# tensors start 64-byte aligned qualify (moeflow's converter pads the header for that)
DATA_ALIGN = 64


def direct_layout(emap: ExpertMap, dtype: torch.dtype, inter: int, hidden: int) -> tuple[int, int] | None:
    """(byte offset of [gate | up], of down) from the start of every expert's run, when every
    expert is one run laid out the same way in the slots' dtype, its matrices 64-byte aligned
    in the file; None otherwise."""
    if emap.dtype != dtype:
        return None
    size, IH = dtype.itemsize, inter * hidden
    layouts = set()
    for runs in emap.extents.values():
        if len(runs) != 1:
            return None
        run = runs[0]
        at, where = 0, {}
        for dst, nbytes in run.pieces:  # in file order
            where[dst] = (at, nbytes)
            at += nbytes
        gate, up, down = where.get(0), where.get(IH), where.get(2 * IH)
        if gate is None or down is None:
            return None
        if up is None:  # gate and up in one piece (a fused gate_up tensor)
            if gate[1] != 2 * IH * size:
                return None
        elif gate[1] != IH * size or up[0] != gate[0] + gate[1]:
            return None
        if (run.offset + gate[0]) % DATA_ALIGN or (run.offset + down[0]) % DATA_ALIGN:
            return None
        layouts.add((gate[0], down[0]))
    return layouts.pop() if len(layouts) == 1 else None


class AioDirectExperts(AioExperts):
    def __init__(self, emap: ExpertMap, spec: SlotSpec, reader: FileReader, layout: tuple[int, int]):
        self._gate_at, self._down_at = layout
        nbytes = spec.numel * spec.dtype.itemsize
        self._stride = (nbytes + 2 * ALIGN - 1) & ~(ALIGN - 1)  # an aligned span of the run always fits
        super().__init__(emap, spec, reader, io_threads=1, pin=False)
        self._base = self.slots.data_ptr()
        self._key_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._view_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._plans: dict[int, tuple] = {}

    def _new_slots(self, n_slots: int, spec: SlotSpec, device, pin: bool) -> torch.Tensor:
        self._map = mmap.mmap(-1, n_slots * self._stride)  # anonymous: page-aligned, zero-filled
        flat = torch.frombuffer(self._map, dtype=spec.dtype)
        return flat.view(n_slots, self._stride // spec.dtype.itemsize)

    def _buffers(self, emap: ExpertMap) -> int:
        return DEPTH  # no bounce buffers: reads land in the slots

    @property
    def nbytes(self) -> int:
        """The budgeted expert bytes (the page of slack per slot is I/O overhead, not cache)."""
        return self.slots.shape[0] * self.expert_nbytes

    @property
    def expert_nbytes(self) -> int:
        return 3 * self.inter * self.hidden * self.slots.element_size()

    @property
    def read_mode(self) -> str:
        return "O_DIRECT, Linux AIO, into the slots"

    def _views(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._key_views[key]

    def _slot_views(self, slot: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The matrices of an expert whose run starts `shift` bytes into slot `slot`."""
        got = self._view_cache.get((slot, shift))
        if got is None:
            if len(self._view_cache) >= 8 * len(self.slots):  # (offsets that never recur)
                self._view_cache.clear()
            size, I, H = self.slots.element_size(), self.inter, self.hidden
            row = self.slots[slot]
            a, b = (shift + self._gate_at) // size, (shift + self._down_at) // size
            got = self._view_cache[slot, shift] = (
                row[a : a + 2 * I * H].view(2 * I, H),
                row[b : b + I * H].view(H, I),
            )
        return got

    # ---- submission and completion

    def _load(self, keys: list[int]) -> None:
        self._submit(keys)  # (more reads than the queue holds go in waves: no copies to serialise)
        self._wait(keys)

    def _plan(self, key: int) -> tuple:
        """(run, fd, aligned start, aligned end) of a key's read, worked out on its first load."""
        plan = self._plans.get(key)
        if plan is None:
            run = self.map.extents[self.layers[key // self.n_experts], key % self.n_experts][0]
            start = run.offset & ~(ALIGN - 1)
            end = (run.offset + run.nbytes + ALIGN - 1) & ~(ALIGN - 1)
            plan = self._plans[key] = (run, self.reader._direct[run.file], start, end)
        return plan

    def _submit(self, keys: list[int]) -> None:
        batch, chunk, depth = [], aio_experts.CHUNK, self.q.depth
        for key in keys:
            run, fd, start, end = self._plan(key)
            slot = int(self.slot_of[key])
            self._key_views[key] = self._slot_views(slot, run.offset - start)
            addr = self._base + slot * self._stride - start  # + a file position: where it lands
            tags = self._pending.setdefault(key, set())
            for pos in range(start, end, chunk):
                if len(batch) + self.q.in_flight >= depth:  # the queue is full: free a place
                    if batch:
                        self._send(batch)
                        batch = []
                    self._complete(self.q.reap(1))
                    tags = self._pending.setdefault(key, tags)  # (re-added if the reap emptied it)
                length = min(chunk, end - pos)
                self._tag += 1
                self._reqs[self._tag] = (key, run, length, pos)
                tags.add(self._tag)
                batch.append((self._tag, fd, addr + pos, length, pos))
        if batch:
            self._send(batch)

    def _finish(self, tag: int, res: int | Exception) -> None:
        """One read is over (res: bytes read, -errno, or why it never started): the key is marked
        failed if its bytes did not all arrive; its tag is released either way."""
        key, run, length, pos = self._reqs.pop(tag)
        try:
            if isinstance(res, Exception):
                raise res
            if res < 0:
                raise OSError(-res, f"reading {run.file.name}: {os.strerror(-res)}")
            end = min(pos + length, run.offset + run.nbytes)
            if pos + res < end:  # (the file's end may cut the aligned read, never the run)
                got = max(0, pos + res - run.offset)
                raise CheckpointError(
                    f"{run.file.name} ended early: read {got} of {run.nbytes} bytes at offset "
                    f"{run.offset} (file truncated or replaced while running)"
                )
            self.reader.bytes_read += end - max(pos, run.offset)
        except Exception as e:  # reported by the fetch that needs this key, not the one reaping
            self._failed.setdefault(key, e)
        finally:
            tags = self._pending.get(key)
            if tags is not None:
                tags.discard(tag)
                if not tags:
                    del self._pending[key]

    def _cancel(self, key: int) -> None:
        # the kernel writes into the slot: it may be given to another key only once the reads landed
        while key in self._pending:
            self._complete(self.q.reap(1))
        self._failed.pop(key, None)
        self._key_views.pop(key, None)

    def close(self) -> None:
        super().close()
        self._view_cache.clear()
        self._key_views.clear()
