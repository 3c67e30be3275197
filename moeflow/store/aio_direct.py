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

import torch

from . import aio_experts
from .aio_experts import AioExperts
from .cached import SlotSpec
from .extents import ExpertMap, Run
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

    def _new_slots(self, n_slots: int, spec: SlotSpec, device, pin: bool) -> torch.Tensor:
        # anonymous: page-aligned, zero-filled; and populated now: otherwise each slot's first
        # read faults its pages in (zeroing them) inside io_submit, on the model's thread, during
        # the first requests (a 4.2 GB budget of 9.4 MB experts: ~0.7 s of store work a request)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(-1, n_slots * self._stride, flags=flags)
        flat = torch.frombuffer(self._map, dtype=spec.dtype)
        return flat.view(n_slots, self._stride // spec.dtype.itemsize)

    def _buffers(self, emap: ExpertMap) -> int:
        self._size = aio_experts.CHUNK  # the largest read: no buffer bounds it here
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

    def _load_start(self, keys: list[int]) -> None:
        self._submit(keys)  # (more reads than the queue holds go in waves: no copies to serialise)

    def _begin(self, key: int) -> None:
        run = self._reads(key)[0][0]
        self._key_views[key] = self._slot_views(int(self.slot_of[key]), run.offset % ALIGN)

    def _target(self, key: int, run: Run, pos: int) -> tuple[int, int]:
        # the run's aligned span from the slot's start: offset pos lands pos - start bytes in
        return -1, self._base + int(self.slot_of[key]) * self._stride + pos - (run.offset & ~(ALIGN - 1))

    def _land(self, key: int, run: Run, buf: int, pos: int, lo: int, hi: int) -> None:
        pass  # the bytes are in the slot already

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
