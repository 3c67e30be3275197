"""Belady's MIN: evict the resident key whose next use is farthest ahead. It reads the future, so
only the simulator can run it; no policy can beat its hit rate at the same capacity (with every
expert of a layer-step needed at once, and without prefetching), so it is the bound to compare with."""

from __future__ import annotations

import numpy as np


class Belady:
    name = "belady"

    def __init__(self, experts: np.ndarray, n_experts: int):
        """experts: [T, L, K] the whole trace's expert ids, -1 = unused slot."""
        T, L, _ = experts.shape
        self.n_layers, self.n_experts, self.never = L, n_experts, T
        self.span = T + 1
        t = np.arange(T, dtype=np.int64)[:, None]
        # one sorted code key * span + t per access; built layer by layer, keys ascend with the layer
        per_layer = []
        for layer in range(L):
            ids = experts[:, layer].astype(np.int64)  # [T, K]
            codes = (layer * n_experts + ids) * self.span + t
            per_layer.append(np.sort(codes[ids >= 0]))
        end = np.array([(L * n_experts + 1) * self.span])  # sentinel: a search never runs off the end
        self.uses = np.concatenate([*per_layer, end])
        self.next = np.full(L * n_experts, float(T))  # next token that uses each key; T = never
        # index in `uses` of each key's first use not yet passed: replayed in order, a use is found
        # by one comparison instead of a binary search over the whole trace
        self.cursor = np.searchsorted(self.uses, np.arange(L * n_experts, dtype=np.int64) * self.span)

    def _next_use(self, keys: np.ndarray, t: int, after: bool) -> np.ndarray:
        """First token > t (after) or >= t that uses each key; `never` if none."""
        query = keys * self.span + t
        i = self.cursor[keys]
        expected = self.uses[i] == query
        i = np.where(expected, i + after, 0)
        odd = ~expected  # out of the replay's order: a prefetch, or a caller's own order
        if odd.any():
            i[odd] = np.searchsorted(self.uses, query[odd], side="right" if after else "left")
        if after:
            self.cursor[keys] = np.maximum(self.cursor[keys], i)
        code = self.uses[i]
        return np.where(code // self.span == keys, code % self.span, self.never).astype(float)

    def touch(self, keys: np.ndarray, t: int) -> None:
        self.next[keys] = self._next_use(keys, t, after=True)

    def admit(self, keys: np.ndarray, t: int) -> None:
        self.next[keys] = self._next_use(keys, t, after=False)  # a prefetch for token t: t itself counts

    def forget(self, keys: np.ndarray) -> None:
        pass

    def priority(self, keys: np.ndarray) -> np.ndarray:
        # steps rather than tokens, so that with one global capacity earlier layers come first
        return -(self.next[keys] * self.n_layers + keys // self.n_experts)
