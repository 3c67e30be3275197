"""A budgeted cache of experts in memory over the checkpoint files on disk.

The model asks `fetch(layer, ids)` exactly as it asks the resident store. Misses are read on
demand into a free slot (one contiguous buffer per expert, preallocated once); an ExpertCache
with a pluggable policy decides membership. After each layer is routed, `on_route` lets a
predictor name the next MoE layer's likely experts and background threads read them while the
current layer computes. Prediction only changes *when* bytes arrive, never which weights a layer
uses: fetch always waits for the exact experts asked for."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import torch

from ..cache.capacity import CacheCapacity
from ..cache.state import ExpertCache
from .extents import ExpertMap
from .reader import FileReader
from .stats import StoreStats


class TieredExperts:
    def __init__(
        self,
        emap: ExpertMap,
        moe_layers: list[int],
        n_experts: int,
        inter: int,
        hidden: int,
        dtype: torch.dtype,
        capacity: CacheCapacity,
        policy,
        io_threads: int = 4,
    ):
        self.map, self.layers, self.n_experts = emap, list(moe_layers), n_experts
        self.inter, self.hidden, self.dtype = inter, hidden, dtype
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.cache = ExpertCache(len(self.layers), n_experts, capacity, policy)
        n_slots = capacity.size * (len(self.layers) if capacity.scope == "layer" else 1)
        self.slots = torch.empty(n_slots, emap.numel, dtype=dtype)  # the whole budget, allocated once
        I, H = inter, hidden  # each slot's [gate | up] and down views, made once (views cost ~10 µs)
        self.slot_views = [(b[: 2 * I * H].view(2 * I, H), b[2 * I * H :].view(H, I)) for b in self.slots]
        self.slot_of = np.full(len(self.layers) * n_experts, -1, dtype=np.int64)
        self.free = list(range(n_slots - 1, -1, -1))
        self.reader = FileReader(sorted({x.file for runs in emap.extents.values() for x in runs}))
        # prefetches and demand misses on pools of their own, so a demand read never queues
        # behind a prefetch; several reads at once keep the disk's queue full
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="moeflow-prefetch")
        self.demand = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="moeflow-read") if io_threads > 1 else None
        )
        self.inflight: dict[int, Future] = {}
        self._local = threading.local()
        self.in_use = np.zeros(0, dtype=np.int64)
        self.step = 0
        self.stats = StoreStats()
        self.predictor = None  # an EnginePredictor (store.predict): names the next layer's experts
        self._routed = None
        self._guess: dict[int, set[int]] = {}  # layer index -> experts predicted for its next use

    @property
    def expert_nbytes(self) -> int:
        return self.map.numel * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size()

    def _views(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot_views[self.slot_of[key]]

    @property
    def at_once(self) -> int:
        """Most experts one fetch may ask for: a batch using more runs them in groups."""
        return self.cache.capacity.size

    def fetch(self, layer: int, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
        li = self.index[layer]
        ids = [int(e) for e in ids]
        acc = self.cache.request(li, ids, self.step)
        self._release(acc.evicted)
        t0 = time.perf_counter()
        keys = [li * self.n_experts + e for e in ids]
        try:
            self._read([int(k) for k in acc.loaded])  # demand misses: read now
            self.stats.demand_read_s += time.perf_counter() - t0
            for key in keys:  # prefetched ones still on their way
                fut = self.inflight.pop(key, None)
                if fut is not None:
                    fut.result()
        except BaseException:
            self._invalidate(keys)  # never leave a half-read slot marked resident
            raise
        self.stats.stall_s += time.perf_counter() - t0
        self.in_use = np.asarray(keys, dtype=np.int64)
        routed = self._routed
        if routed is not None and routed[0] == layer:
            routed[4].difference_update(ids)
            if not routed[4]:  # this layer's last group is read: start the next layer's reads
                self._routed = None
                self._predict(li, *routed[1:4])
        return [self._views(k) for k in keys]

    def _predict(self, li: int, x: torch.Tensor, ids: torch.Tensor, used: frozenset[int]) -> None:
        guess = self._guess.pop(li, None)
        if guess is not None:  # score the guess made for this layer
            s = self.stats
            s.predicted, s.used, s.predicted_used = (
                s.predicted + len(guess),
                s.used + len(used),
                s.predicted_used + len(guess & used),
            )
        nxt = self.predictor.next_experts(li, x, ids, self.prefetch_room(ids)) if self.predictor else None
        if nxt is not None:
            nli, chosen = nxt
            self.prefetch(self.layers[nli], chosen)
            self._guess[nli] = {int(e) for e in chosen}

    def prefetch(self, layer: int, ids) -> None:
        """Starts background reads of experts `ids` of `layer`; never evicts the running layer's."""
        if not len(ids):
            return
        acc = self.cache.prefetch(self.index[layer], np.asarray(ids), self.step, protect=self.in_use)
        self._release(acc.evicted)
        for key in acc.loaded:
            key = int(key)
            self.slot_of[key] = self.free.pop()
            self.inflight[key] = self.pool.submit(self._fill, key)

    def prefetch_room(self, ids: torch.Tensor) -> int:
        """How many experts to prefetch after a layer routed `ids` [T, K]: no more than that layer
        used, plus the predictor's margin (a guess much beyond it mostly evicts useful experts), and
        no more than fit beside the running layer's."""
        cap = self.cache.capacity
        room = cap.per_layer if cap.scope == "layer" else max(0, cap.total - len(self.in_use))
        margin = getattr(self.predictor, "margin", 0)
        return min(room, int((ids >= 0).sum()) + margin * ids.shape[0])

    def on_route(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Called by the MoE block once layer `layer` is routed (x: its input, ids [T, K]); the
        predictor runs after this layer's own misses are read, so it never delays them."""
        if self.index[layer] == 0:
            self.step += 1
        used = frozenset(ids[ids >= 0].unique().tolist())
        self._routed = (layer, x, ids, used, set(used))  # the last set: experts not fetched yet

    def _release(self, evicted: np.ndarray) -> None:
        for key in evicted:
            key = int(key)
            fut = self.inflight.pop(key, None)
            if fut is not None and not fut.cancel():  # already writing into the slot: let it land
                fut.exception()  # a failed read of a key that is leaving anyway is no error
            self.free.append(int(self.slot_of[key]))
            self.slot_of[key] = -1

    def _invalidate(self, keys: list[int]) -> None:
        """After a failed read: the keys leave the cache and their slots are free again, so a
        later request reads them afresh instead of computing with partial bytes."""
        self._release(self.cache.drop(np.asarray(keys, dtype=np.int64)))  # (resident keys have slots)

    def _read(self, keys: list[int]) -> None:
        for key in keys:
            self.slot_of[key] = self.free.pop()
        if self.demand is not None and len(keys) > 1:
            futures = [self.demand.submit(self._fill, key) for key in keys]
            wait(futures)  # all of them, even when one fails: none may still write into a slot
            for fut in futures:
                fut.result()  # re-raises a failed read here
        else:
            for key in keys:
                self._fill(key)
        self.stats.demand_loads += len(keys)

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

    def report(self) -> dict:
        return self.stats.report(self)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.demand is not None:
            self.demand.shutdown(wait=True)
        self.reader.close()
