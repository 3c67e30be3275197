"""What every budgeted expert store shares, whatever its tiers: slots, membership, prediction.

A store keeps a fixed set of slots (one contiguous buffer per expert, preallocated once) in its
fast tier, an ExpertCache with a pluggable policy that decides which (layer, expert) keys hold
them, and an optional predictor that names the next MoE layer's likely experts once a layer is
routed. Subclasses say how bytes reach a slot from the slow tier: `_load` (demand misses, the
layer waits), `_start` (a prefetch, nobody waits) and `_arrive` (keys about to be used must
have landed). Prediction only changes *when* bytes arrive, never which weights a layer uses:
`fetch` always returns the exact experts asked for."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..cache.capacity import CacheCapacity
from ..cache.state import ExpertCache
from .stats import StoreStats


def _nothing() -> None:
    pass


class _Routed(NamedTuple):
    """A layer routed and not yet fully fetched: what its prediction of the next layer needs."""

    layer: int
    x: torch.Tensor  # the layer's input [T, H]
    ids: torch.Tensor  # [T, K], -1 = unused
    used: frozenset[int]  # the experts it chose
    unfetched: set[int]  # those not fetched yet
    picks: int  # valid entries of ids


@dataclass(frozen=True)
class SlotSpec:
    """What a budgeted store holds: the model's expert geometry, the slots' dtype, how many slots
    (capacity) and who picks their occupants (policy)."""

    layers: list[int]  # the MoE layers' indices in the model
    n_experts: int
    inter: int  # an expert's intermediate width
    hidden: int
    dtype: torch.dtype  # of the slots (the compute dtype)
    capacity: CacheCapacity
    policy: object  # a cache.policies Policy

    @property
    def numel(self) -> int:
        return 3 * self.inter * self.hidden  # [gate | up | down]


class CachedExperts:
    def __init__(self, spec: SlotSpec, device="cpu", pin: bool = False):
        self.layers, self.n_experts = list(spec.layers), spec.n_experts
        self.inter, self.hidden, self.dtype = spec.inter, spec.hidden, spec.dtype
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        capacity = spec.capacity
        self.cache = ExpertCache(len(self.layers), self.n_experts, capacity, spec.policy)
        n_slots = capacity.size * (len(self.layers) if capacity.scope == "layer" else 1)
        self.slots = self._new_slots(n_slots, spec, device, pin)  # the whole budget, allocated once
        I, H = spec.inter, spec.hidden  # each slot's [gate | up] and down views, made once (~10 µs each)
        self.slot_views = [
            (b[: 2 * I * H].view(2 * I, H), b[2 * I * H : 3 * I * H].view(H, I)) for b in self.slots
        ]
        self.slot_of = np.full(len(self.layers) * self.n_experts, -1, dtype=np.int64)
        self.free = list(range(n_slots - 1, -1, -1))
        self.in_use: list[int] = []  # the keys of the layer running now
        self.step = 0
        self.stats = StoreStats()
        self.predictor = None  # an EnginePredictor (store.predict): names the next layer's experts
        self._routed = None
        self._guess: dict[int, set[int]] = {}  # layer index -> experts predicted for its next use
        # a staged fetch whose layer waits for reads runs the next layer's prediction and
        # prefetch in that wait, not before the experts it has: see fetch_staged
        self.predict_in_wait = True
        self._due: tuple[int, _Routed] | None = None  # (layer index, routing) to predict from

    # ---- what a subclass provides

    def _new_slots(self, n_slots: int, spec: SlotSpec, device, pin: bool) -> torch.Tensor:
        """[n_slots, >= spec.numel] of spec.dtype: one row per slot."""
        return torch.empty(n_slots, spec.numel, dtype=spec.dtype, device=device, pin_memory=pin)

    def _load(self, keys: list[int]) -> None:
        """Fills the (already assigned) slots of demand-missed keys; returns once they are usable."""
        raise NotImplementedError

    def _load_start(self, keys: list[int]) -> None:
        """Starts filling demand-missed keys' slots; _landing and _arrive then see them as in
        flight. A store whose reads cannot be left in flight loads them here and now."""
        self._load(keys)

    def _landing(self, keys: list[int]) -> list[int]:
        """Of keys about to be used, those whose bytes may still be arriving (none, for a store
        that waits for them here); raises for any that already failed."""
        self._arrive(keys)
        return []

    def _start(self, key: int) -> None:
        """Starts filling the (already assigned) slot of a prefetched key; must not wait."""
        raise NotImplementedError

    def _start_all(self, keys: list[int]) -> None:
        """Starts filling several keys' slots (a store that can submit a batch at once overrides this)."""
        for key in keys:
            self._start(key)

    def _arrive(self, keys: list[int]) -> None:
        """The keys are about to be used: waits for their prefetches, if any is still under way."""

    def _cancel(self, key: int) -> None:
        """Key leaves the cache: its slot is about to be reused, so nothing may still write it."""

    # ---- the store interface the model uses

    @property
    def expert_nbytes(self) -> int:
        return self.slots.shape[1] * self.slots.element_size()

    @property
    def load_nbytes(self) -> int:
        """Bytes one expert load moves from the slow tier."""
        return self.expert_nbytes

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size()

    @property
    def at_once(self) -> int:
        """Most experts one fetch may ask for: a batch using more runs them in groups."""
        return self.cache.capacity.size

    def _views(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot_views[self.slot_of[key]]

    def fetch(self, layer: int, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t0 = time.perf_counter()
        try:
            return self._weights(self._fetch(layer, ids, wait=True)[0])
        finally:
            self.stats.store_s += time.perf_counter() - t0

    def fetch_staged(self, layer: int, ids) -> tuple[list, list[int], Callable[[], None]]:
        """Like fetch, but returns once the demand misses' reads are started rather than landed:
        (weights, positions in ids of those still arriving, settle). The weights at the other
        positions are usable now; settle() returns once the late ones are too (or raises why
        not). The caller computes the experts it has while the rest are read."""
        t0 = time.perf_counter()
        try:
            keys, demand = self._fetch(layer, ids, wait=False, defer=self.predict_in_wait)
            try:
                late = self._landing(keys)
            except BaseException:
                self._invalidate(keys)
                raise
            if not late:
                self._predict_due()
        finally:
            self.stats.store_s += time.perf_counter() - t0
        if not late:
            return self._weights(keys), [], _nothing
        late_set = set(late)

        def settle() -> None:
            # the next layer's prediction and prefetch first: ~0.1 ms of work a layer (much of it
            # io_submit) that would otherwise delay the experts computed before this call, done
            # while this layer's reads are still landing
            t0 = time.perf_counter()
            self._predict_due()
            self.stats.store_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                self._arrive(late)
            except BaseException:
                self._invalidate(keys)
                raise
            waited = time.perf_counter() - t0
            self.stats.stall_s += waited
            self.stats.store_s += waited
            if demand:
                self.stats.demand_read_s += waited

        return self._weights(keys), [i for i, k in enumerate(keys) if k in late_set], settle

    def _fetch(self, layer: int, ids, wait: bool, defer: bool = False) -> tuple[list[int], bool]:
        """Makes ids' experts of `layer` resident (reads started; landed too if `wait`), then
        starts the next layer's predicted reads (or, if `defer`, leaves that to _predict_due);
        returns their keys and whether any was a demand miss."""
        self._due = None  # (a prediction left over from a step that failed before settling)
        li = self.index[layer]
        ids = [int(e) for e in ids]
        loaded, evicted = self.cache.request_lists(li, ids, self.step)
        if evicted:
            self._release(evicted)
        t0 = time.perf_counter()
        keys = [li * self.n_experts + e for e in ids]
        try:
            if loaded:
                for key in loaded:
                    self.slot_of[key] = self.free.pop()
                if wait:
                    self._load(loaded)  # demand misses: read now
                else:
                    self._load_start(loaded)
                self.stats.demand_loads += len(loaded)
                self.stats.demand_read_s += time.perf_counter() - t0
            if wait:
                self._arrive(keys)  # prefetched ones still on their way
        except BaseException:
            self._invalidate(keys)  # never leave a half-filled slot marked resident
            raise
        self.stats.stall_s += time.perf_counter() - t0
        self.in_use = keys
        routed = self._routed
        if routed is not None and routed.layer == layer:
            routed.unfetched.difference_update(ids)
            if not routed.unfetched:  # this layer's last group is in: start the next layer's reads
                self._routed = None
                if defer:
                    self._due = (li, routed)
                else:
                    self._predict(li, routed)
        return keys, bool(loaded)

    def _predict_due(self) -> None:
        due, self._due = self._due, None
        if due is not None:
            self._predict(*due)

    def _weights(self, keys: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._views(k) for k in keys]

    def _predict(self, li: int, routed: _Routed) -> None:
        used = routed.used
        guess = self._guess.pop(li, None)
        if guess is not None:  # score the guess made for this layer
            s = self.stats
            s.predicted, s.used, s.predicted_used = (
                s.predicted + len(guess),
                s.used + len(used),
                s.predicted_used + len(guess & used),
            )
        if self.predictor is None:
            return
        ids = routed.ids
        nxt = self.predictor.next_experts(li, routed.x, ids, self.prefetch_room(routed.picks, ids.shape[0]))
        if nxt is not None:
            nli, chosen = nxt
            self.prefetch(self.layers[nli], chosen)
            self._guess[nli] = {int(e) for e in chosen}

    def prefetch(self, layer: int, ids) -> None:
        """Starts bringing in experts `ids` of `layer`; never evicts the running layer's."""
        li = self.index[layer]
        if not len(ids) or self.cache.all_resident(li, ids):  # (the usual case at a large budget)
            return
        cap = self.cache.capacity
        if cap.scope == "layer":  # a model of one MoE layer prefetches into the layer running
            ids = ids[: cap.per_layer - sum(1 for k in self.in_use if k // self.n_experts == li)]
        loaded, evicted = self.cache.prefetch_lists(li, ids, self.step, protect=self.in_use)
        if evicted:
            self._release(evicted)
        for key in loaded:
            self.slot_of[key] = self.free.pop()
        try:
            self._start_all(loaded)
        except BaseException:
            self._invalidate(loaded)  # none of them may stay resident without its bytes on the way
            raise

    def prefetch_room(self, picks: int, tokens: int) -> int:
        """How many experts to prefetch after a layer routed `tokens` tokens to `picks` experts in
        all: no more than that layer used, plus the predictor's margin per token (a guess much
        beyond it mostly evicts useful experts), and no more than fit beside the running layer's."""
        cap = self.cache.capacity
        room = cap.per_layer if cap.scope == "layer" else max(0, cap.total - len(self.in_use))
        margin = getattr(self.predictor, "margin", 0)
        return min(room, picks + margin * tokens)

    def on_route(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Called by the MoE block once layer `layer` is routed (x: its input, ids [T, K]); the
        predictor runs after this layer's own misses are in, so it never delays them."""
        if self.index[layer] == 0:
            self.step += 1
        if self.predictor is None and not self._guess:  # nothing to predict, no guess to score
            return
        t0 = time.perf_counter()
        flat = ids.reshape(-1).tolist()  # (python from here: cheaper than torch ops on a few ids)
        used = frozenset(flat) - {-1}
        picks = len(flat) - flat.count(-1)
        self._routed = _Routed(layer, x, ids, used, set(used), picks)
        self.stats.store_s += time.perf_counter() - t0

    def _release(self, evicted: list[int]) -> None:
        for key in evicted:
            self._cancel(key)
            self.free.append(int(self.slot_of[key]))
            self.slot_of[key] = -1

    def _invalidate(self, keys: list[int]) -> None:
        """After a failed load: the keys leave the cache and their slots are free again, so a
        later request loads them afresh instead of computing with partial bytes."""
        dropped = self.cache.drop(np.asarray(keys, dtype=np.int64))  # (resident keys have slots)
        self._release(dropped.tolist())

    def report(self) -> dict:
        return self.stats.report(self)

    def close(self) -> None:
        pass
