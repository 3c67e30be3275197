"""ExpertCache's engine path (request / prefetch of one layer) for the cyclic policy, in one
native call (moeflow/kernels/cache.c) instead of a dozen numpy calls on a handful of keys.

The native code reads and writes the cache's own arrays (flags, counts, the policy's scores and
its last touch), so the Python paths (request_layers, drop) still see one consistent state and
may be mixed with it. It takes the same decisions as the numpy path, bit for bit in the scores;
tests/test_cache_native.py replays traces through both."""

from __future__ import annotations

import ctypes

import numpy as np

from ..kernels import native_cache
from .policies import Cyclic


class _State(ctypes.Structure):  # mf_cache in cache.c
    _fields_ = [
        ("L", ctypes.c_int64),
        ("E", ctypes.c_int64),
        ("per_layer", ctypes.c_int64),
        ("total_cap", ctypes.c_int64),
        ("resident", ctypes.c_void_p),
        ("pending", ctypes.c_void_p),
        ("protect", ctypes.c_void_p),
        ("count", ctypes.c_void_p),
        ("total", ctypes.c_void_p),
        ("score", ctypes.c_void_p),
        ("half_life", ctypes.c_double),
        ("full", ctypes.c_double),
        ("cyc", ctypes.c_void_p),
        ("rank", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("loaded", ctypes.c_void_p),
        ("evicted", ctypes.c_void_p),
        ("res", ctypes.c_void_p),
    ]


def twin(cache) -> NativeCyclic | None:
    """The native engine path for `cache`, where its policy is exactly Cyclic and the library
    builds; None otherwise (the numpy path serves)."""
    policy = cache.policy
    if type(policy) is not Cyclic or (policy.n_layers, policy.n_experts) != (cache.n_layers, cache.n_experts):
        return None  # (a policy of another geometry: numpy's path raises where C would overrun)
    lib = native_cache()
    return None if lib is None else NativeCyclic(cache, lib)


class NativeCyclic:
    def __init__(self, cache, lib):
        self.cache, policy, cap = cache, cache.policy, cache.capacity
        L, E = cache.n_layers, cache.n_experts
        n = L * E
        self._protect = np.zeros(n, dtype=np.uint8)
        self._rank = np.zeros(n)
        self._keys = np.zeros(E, dtype=np.int64)
        self._loaded = np.zeros(n, dtype=np.int64)
        self._evicted = np.zeros(n, dtype=np.int64)
        self._res = np.zeros(5, dtype=np.int64)
        self._ids = np.zeros(max(E, 64), dtype=np.int64)
        arrays = (cache.resident, cache.pending, cache.count, cache._n, policy.score, policy._lt)
        for a in arrays:  # the native code holds their addresses: they are never reallocated
            assert a.flags.c_contiguous
        self._state = _State(
            L,
            E,
            -1 if cap.per_layer is None else cap.per_layer,
            -1 if cap.total is None else cap.total,
            *(a.ctypes.data for a in (cache.resident, cache.pending, self._protect, cache.count, cache._n)),
            policy.score.ctypes.data,
            policy.half_life,
            policy.full,
            *(
                a.ctypes.data
                for a in (policy._lt, self._rank, self._keys, self._loaded, self._evicted, self._res)
            ),
        )
        self._ref = ctypes.byref(self._state)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._request, self._prefetch = lib.mf_cache_request, lib.mf_cache_prefetch
        self._request.argtypes = [ptr, i64, ptr, i64, i64]
        self._prefetch.argtypes = [ptr, i64, ptr, i64, ptr, i64]
        self._request.restype = self._prefetch.restype = ctypes.c_int
        self._ids_at = self._ids.ctypes.data
        from .state import Access  # (state imports this module)

        self._access = Access

    def _put(self, ids) -> int:
        """ids (list, ndarray or tensor) into the id buffer; returns how many."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        n = len(ids)
        if n > len(self._ids):
            self._ids = np.zeros(2 * n, dtype=np.int64)
            self._ids_at = self._ids.ctypes.data
        self._ids[:n] = ids
        return n

    def _check(self, rc: int, what: str) -> None:
        if rc == -1:
            raise ValueError(f"expert id {int(self._res[0])} out of range for {self.cache.n_experts} experts")
        if rc == -2:
            self.cache.capacity.check_fits(int(self._res[0]), what)  # raises, naming the budget
        if rc == -4:
            raise IndexError(f"layer or protected key out of range for {self.cache.n_layers} layers")
        if rc:
            raise RuntimeError(f"native expert cache failed ({rc}): too few experts to evict")

    def request(self, layer: int, ids, t: int):
        loaded, evicted = self.request_lists(layer, ids, t)
        m, n_new, _, first, _ = self._res.tolist()
        return self._access(
            np.array([m - n_new]), np.array([n_new]), np.array([first]), _ints(loaded), _ints(evicted)
        )

    def request_lists(self, layer: int, ids, t: int) -> tuple[list[int], list[int]]:
        """request's keys loaded and evicted, as lists: all the engine's fetch reads of it."""
        n = self._put(ids)
        rc = self._request(self._ref, layer, self._ids_at, n, t)
        self._check(rc, "experts of one layer-step")
        m, n_new, n_ev, first, wasted = self._res.tolist()
        s = self.cache.stats
        s.accesses, s.hits, s.misses = s.accesses + m, s.hits + m - n_new, s.misses + n_new
        if first:
            s.prefetch_hits += first
        if n_ev:
            s.evictions += n_ev
            s.wasted_prefetches += wasted
        return self._lists(n_new, n_ev)

    def prefetch(self, layer: int, ids, t: int, protect=None):
        loaded, evicted = self.prefetch_lists(layer, ids, t, protect)
        m, n_new = self._res.tolist()[:2]
        return self._access(
            np.array([m - n_new]), np.array([n_new]), np.zeros(1, int), _ints(loaded), _ints(evicted)
        )

    def prefetch_lists(self, layer: int, ids, t: int, protect=None) -> tuple[list[int], list[int]]:
        n = self._put(ids)
        if protect is None or not len(protect):
            prot, n_prot = None, 0
        else:
            protect = protect.tolist() if hasattr(protect, "tolist") else protect
            n_prot = len(protect)
            prot = (ctypes.c_int64 * n_prot)(*protect)
        rc = self._prefetch(self._ref, layer, self._ids_at, n, prot, n_prot)
        self._check(rc, "experts of a prefetch and of the layer running")
        _, n_new, n_ev, _, wasted = self._res.tolist()
        s = self.cache.stats
        s.prefetches += n_new
        if n_ev:
            s.evictions += n_ev
            s.wasted_prefetches += wasted
        return self._lists(n_new, n_ev)

    def _lists(self, n_new: int, n_ev: int) -> tuple[list[int], list[int]]:
        return (self._loaded[:n_new].tolist() if n_new else []), (
            self._evicted[:n_ev].tolist() if n_ev else []
        )


def _ints(keys: list[int]) -> np.ndarray:
    return np.array(keys, dtype=np.int64)
