"""Eviction policies for an expert cache. A policy only ranks keys; the cache owns membership.

Keys are flat ints `layer * n_experts + expert` (layer = index among the MoE layers). Every call
takes a 1-D int array of keys, so one policy object serves the engine (one layer at a time) and
the simulator (all layers of a token at once). `priority` is lower for the key to evict first."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .capacity import CacheCapacity

PINNED = 1e18  # above any recency tick: pinned keys go only if nothing else can


class Policy(Protocol):
    name: str

    def touch(self, keys: np.ndarray, t: int) -> None:
        """The keys were used by token t (a hit, or right after their admission)."""

    def admit(self, keys: np.ndarray, t: int) -> None:
        """The keys entered the cache for token t (on demand, or prefetched ahead of their use)."""

    def forget(self, keys: np.ndarray) -> None:
        """The keys left the cache."""

    def priority(self, keys: np.ndarray) -> np.ndarray:
        """float64 rank of each key; the cache evicts the lowest among those not in use."""


class LRU:
    """Least recently used. Its own tick orders calls, so the token index t may repeat."""

    name = "lru"

    def __init__(self, n_keys: int):
        self.last = np.zeros(n_keys)
        self.tick = 0

    def touch(self, keys: np.ndarray, t: int) -> None:
        self.tick += 1
        self.last[keys] = self.tick

    def admit(self, keys: np.ndarray, t: int) -> None:
        self.touch(keys, t)

    def forget(self, keys: np.ndarray) -> None:
        pass

    def priority(self, keys: np.ndarray) -> np.ndarray:
        return self.last[keys]


class LFU(LRU):
    """Least frequently used, LRU among equals. Counts outlive eviction (a returning expert keeps
    its history); with `halve_every` tokens, all counts halve that often so old popularity fades."""

    name = "lfu"

    def __init__(self, n_keys: int, halve_every: int | None = None):
        super().__init__(n_keys)
        self.count = np.zeros(n_keys, dtype=np.int64)
        self.halve_every = halve_every
        self._epoch = 0

    def touch(self, keys: np.ndarray, t: int) -> None:
        if self.halve_every:
            epoch = t // self.halve_every
            if epoch > self._epoch:
                self.count >>= min(epoch - self._epoch, 62)
                self._epoch = epoch
        self.count[keys] += 1
        super().touch(keys, t)

    def admit(self, keys: np.ndarray, t: int) -> None:
        LRU.touch(self, keys, t)  # a prefetched key is recent but not yet used

    def priority(self, keys: np.ndarray) -> np.ndarray:
        return self.count[keys] * 2.0**32 + self.last[keys]  # exact in float64 below 2**21 uses


class Pinned(LRU):
    """A hot set chosen ahead from a usage profile never leaves; the other slots are LRU."""

    name = "pinned"

    def __init__(self, pinned: np.ndarray):
        super().__init__(len(pinned))
        self.pinned = pinned.astype(bool)

    def priority(self, keys: np.ndarray) -> np.ndarray:
        return self.last[keys] + PINNED * self.pinned[keys]


def hot_set(profile: np.ndarray, capacity: CacheCapacity, top_k: int, fraction: float) -> np.ndarray:
    """[L*E] bool: the most used experts of `profile` [L, E], `fraction` of the capacity, always leaving
    room for top_k unpinned slots so a token whose experts are all cold still fits."""
    L, E = profile.shape
    if capacity.per_layer is not None:
        n = max(0, min(int(fraction * capacity.per_layer), capacity.per_layer - top_k, E))
        hot = np.argsort(-profile, axis=1, kind="stable")[:, :n]  # [L, n]
        keys = (np.arange(L)[:, None] * E + hot).ravel()
    else:
        n = max(0, min(int(fraction * capacity.total), capacity.total - top_k, L * E))
        keys = np.argsort(-profile.ravel(), kind="stable")[:n]
    mask = np.zeros(L * E, dtype=bool)
    mask[keys] = True
    return mask


class Reuse:
    """Evicts the key whose next use looks farthest away: Belady's rule with the future estimated.

    Each key keeps an exponentially decayed count of the tokens that used it (half-life in tokens),
    so rate = decayed count x (1 - decay) estimates the chance the key's layer picks it per token:
    it blends popularity (LFU) and recency (LRU). Expected steps to the next use are the steps until
    the forward pass reaches the key's layer again, plus one full pass per token expected to miss
    it. With a per-layer capacity the first term is constant, so this ranks by rate; with one global
    capacity it also keeps the layers just ahead, which LRU evicts first (they were used longest ago)."""

    name = "reuse"

    def __init__(self, n_layers: int, n_experts: int, half_life: float = 32.0):
        self.n_layers, self.n_experts = n_layers, n_experts
        self.decay = 0.5 ** (1.0 / half_life)
        self.value = np.zeros(n_layers * n_experts)  # decayed use count as of token `updated`
        self.updated = np.zeros(n_layers * n_experts)
        self.now = (0, 0)  # (token, layer) of the latest use: where the forward pass is

    def _decayed(self, keys: np.ndarray, t: int) -> np.ndarray:
        return self.value[keys] * self.decay ** np.maximum(t - self.updated[keys], 0)

    def touch(self, keys: np.ndarray, t: int) -> None:
        self.value[keys] = self._decayed(keys, t) + 1.0
        self.updated[keys] = np.maximum(self.updated[keys], t)
        if len(keys):
            self.now = max(self.now, (t, int(keys.max()) // self.n_experts))

    def admit(self, keys: np.ndarray, t: int) -> None:
        pass  # a prefetched key has no use yet; a demanded one is touched right after

    def forget(self, keys: np.ndarray) -> None:
        pass  # the history stays: an evicted popular expert comes back with its rate

    def priority(self, keys: np.ndarray) -> np.ndarray:
        t, layer = self.now
        rate = self._decayed(keys, t) * (1.0 - self.decay)
        tokens_away = 1.0 / np.maximum(rate, 1e-12)
        phase = (keys // self.n_experts - layer - 1) % self.n_layers + 1  # steps until its layer runs
        return -(phase + self.n_layers * (tokens_away - 1.0))
