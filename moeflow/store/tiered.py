"""A budgeted cache of experts in RAM over the checkpoint files on disk.

The model asks `fetch(layer, ids)` exactly as it asks the resident store. Misses are read on
demand into a free slot by a pool of reader threads (several reads at once keep the disk's queue
full); prefetches named by the predictor are read by a pool of their own while the current layer
computes, so a demand read never queues behind a prefetch."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from .cached import CachedExperts, SlotSpec
from .extents import ExpertMap
from .reader import FileReader


class TieredExperts(CachedExperts):
    def __init__(
        self,
        emap: ExpertMap,
        spec: SlotSpec,
        io_threads: int = 4,
        pin: bool = False,
        reader: FileReader | None = None,  # the checkpoint's files, already open
    ):
        super().__init__(spec, pin=pin)
        self.map = emap
        self.reader = reader or FileReader(emap.files)
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="moeflow-prefetch")
        self.demand = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="moeflow-read") if io_threads > 1 else None
        )
        self.inflight: dict[int, Future] = {}
        self._local = threading.local()

    @property
    def load_nbytes(self) -> int:
        return self.map.nbytes  # in the disk's dtype

    @property
    def bytes_moved(self) -> int:
        return self.reader.bytes_read

    @property
    def read_mode(self) -> str:
        return self.reader.mode

    def _load(self, keys: list[int]) -> None:
        if self.demand is not None and len(keys) > 1:
            futures = [self.demand.submit(self._fill, key) for key in keys]
            wait(futures)  # all of them, even when one fails: none may still write into a slot
            for fut in futures:
                fut.result()  # re-raises a failed read here
        else:
            for key in keys:
                self._fill(key)

    def _start(self, key: int) -> None:
        self.inflight[key] = self.pool.submit(self._fill, key)

    def _arrive(self, keys: list[int]) -> None:
        if self.inflight:
            for key in keys:
                fut = self.inflight.pop(key, None)
                if fut is not None:
                    fut.result()

    def _cancel(self, key: int) -> None:
        fut = self.inflight.pop(key, None)
        if fut is not None and not fut.cancel():  # already writing into the slot: let it land
            fut.exception()  # a failed read of a key that is leaving anyway is no error

    def _fill(self, key: int) -> None:
        layer, e = self.layers[key // self.n_experts], key % self.n_experts
        extents = self.map.extents[layer, e]
        dst = self.slots[self.slot_of[key]]
        if self.map.dtype == self.dtype:
            self.reader.read_into(extents, dst)
        else:  # read in the disk dtype, convert into the slot
            stage = getattr(self._local, "stage", None)
            if stage is None:
                stage = self._local.stage = torch.empty(self.map.numel, dtype=self.map.dtype)
            self.reader.read_into(extents, stage)
            dst.copy_(stage)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.demand is not None:
            self.demand.shutdown(wait=True)
        self.reader.close()
