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
        """float64 rank of each key, a new array (the cache marks it); the cache evicts the
        lowest among those not in use."""


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
    """Evicts the key least likely to be used again soon, scored by an exponentially decayed count
    of the tokens that used it (a use `half_life` tokens ago counts half). A short memory makes it
    LRU and a long one LFU; in between it keeps experts that are popular and in current use, where
    LRU drops a popular expert after a few tokens without it and LFU holds on to old favourites.
    This is LRFU (Lee et al., 2001) with decay per token rather than per reference.

    The count is kept as log2(count) + t / half_life, which ranks keys as the decayed counts do at
    any moment, needs no decay step for untouched keys, and never underflows."""

    name = "reuse"

    def __init__(self, n_keys: int, half_life: float = 32.0):
        self.half_life = half_life
        self.score = np.full(n_keys, -np.inf)  # never used

    def touch(self, keys: np.ndarray, t: int) -> None:
        self.score[keys] = np.logaddexp2(self.score[keys], t / self.half_life)  # decayed count + 1

    def admit(self, keys: np.ndarray, t: int) -> None:
        pass  # a prefetched key has no use yet; a demanded one is touched right after

    def forget(self, keys: np.ndarray) -> None:
        pass  # the history stays: an evicted popular expert comes back with its count

    def priority(self, keys: np.ndarray) -> np.ndarray:
        return self.score[keys]


class Cyclic(Reuse):
    """Reuse's decayed counts, plus what a budget shared by all layers should know: layers run in
    a fixed cycle. A layer's experts are next needed when the cycle comes back to that layer,
    so an expert of the layer that just ran is needed last and one of the next layer soonest;
    LRU ranks exactly the other way round and, with a budget below about one token's experts,
    thrashes (each layer evicts the experts the next layers are about to use).

    Estimated steps to a key's next use: the layers until its layer runs again, plus a whole
    cycle for each token it is expected to skip, (1 / p - 1) cycles, p being its decayed use rate
    per token (a key used by every token has p = 1). The cache evicts the largest estimate."""

    name = "cyclic"

    def __init__(self, n_layers: int, n_experts: int, half_life: float = 32.0):
        super().__init__(n_layers * n_experts, half_life)
        self.n_layers, self.n_experts = n_layers, n_experts
        self.full = -np.log2(1 - 2 ** (-1 / half_life))  # log2 count of a key used every token
        # the last touch, (layer, token): an array, since the native cache updates it too
        self._lt = np.zeros(2, dtype=np.int64)

    @property
    def layer(self) -> int:  # the layer running now (the last one touched)
        return int(self._lt[0])

    @property
    def t(self) -> int:
        return int(self._lt[1])

    def touch(self, keys: np.ndarray, t: int) -> None:
        super().touch(keys, t)
        if len(keys):
            self._lt[:] = (int(keys[0]) // self.n_experts, t)

    def priority(self, keys: np.ndarray) -> np.ndarray:
        # (in place, on one array: asked on every miss, for every resident key)
        L = self.n_layers
        ahead = keys // self.n_experts
        ahead -= self.layer + 1
        ahead %= L  # layers until the key's layer runs
        # log2 of the rate p: the decayed count at token t relative to an always-used key's
        r = self.score[keys]
        r -= self.t / self.half_life
        r -= self.full
        np.minimum(r, 0.0, out=r)
        np.maximum(r, -60.0, out=r)
        np.negative(r, out=r)
        np.exp2(r, out=r)
        r -= 1.0  # tokens expected between uses
        r *= L
        r += ahead
        return np.negative(r, out=r)  # lowest goes first: the furthest next use
