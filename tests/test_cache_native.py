"""The native engine path of the cyclic cache (cache.native, kernels/cache.c) against the numpy
path it replaces: the same decisions, counters and float state, call for call."""

import numpy as np
import pytest

from moeflow.cache.capacity import CacheCapacity
from moeflow.cache.policies import LRU, Cyclic
from moeflow.cache.state import ExpertCache
from moeflow.errors import ConfigError
from moeflow.kernels import native_cache

pytestmark = pytest.mark.skipif(native_cache() is None, reason="no C compiler")

L, E, K = 6, 16, 4


def routing(steps: int, seed: int) -> np.ndarray:
    """[steps, L, K] expert ids with skew and locality, as real routing has: each layer draws
    from its own popularity, and a token often keeps experts of the previous token; some rows run
    fewer than K experts (-1) or name one twice."""
    rng = np.random.default_rng(seed)
    pop = rng.dirichlet(np.full(E, 0.4), size=L)
    out = np.zeros((steps, L, K), dtype=np.int64)
    for t in range(steps):
        for layer in range(L):
            if t and rng.random() < 0.5:
                out[t, layer] = out[t - 1, layer]
            else:
                out[t, layer] = rng.choice(E, K, replace=False, p=pop[layer])
            if rng.random() < 0.05:
                out[t, layer, -1] = -1
            if rng.random() < 0.05:
                out[t, layer, 1] = out[t, layer, 0]
    return out


def fields(acc) -> list:
    return [
        acc.hits.tolist(),
        acc.misses.tolist(),
        acc.prefetch_hits.tolist(),
        acc.loaded.tolist(),
        acc.evicted.tolist(),
    ]


@pytest.mark.parametrize(
    "capacity",
    [
        CacheCapacity(total=L * E // 2),
        CacheCapacity(total=L * K + 2),
        CacheCapacity(total=K),
        CacheCapacity(per_layer=K + 3),
        CacheCapacity(per_layer=K),
    ],
    ids=lambda c: c.describe(),
)
def test_native_cyclic_takes_the_numpy_decisions(capacity):
    native, numpy = (
        ExpertCache(L, E, capacity, Cyclic(L, E, half_life=8.0), native=n) for n in (True, False)
    )
    assert native._native is not None and numpy._native is None
    rng = np.random.default_rng(1)
    for t, step in enumerate(routing(300, seed=2)):
        for layer in range(L):
            ids = step[layer]
            assert fields(native.request(layer, ids, t)) == fields(numpy.request(layer, ids, t)), (t, layer)
            held = np.unique(ids[ids >= 0]) + layer * E
            room = capacity.size - (len(held) if capacity.per_layer is None else 0)
            if room > 0 and rng.random() < 0.6:  # a guess at the next layer, beside the running one
                guess = rng.choice(E, min(room, K + 1), replace=False)
                nxt = (layer + 1) % L
                protect = held if nxt != layer else None
                a, b = (c.prefetch(nxt, guess, t, protect=protect) for c in (native, numpy))
                assert fields(a) == fields(b), (t, layer)
            if rng.random() < 0.02:  # a failed read drops keys behind the native code's back
                keys = held[:1]
                assert native.drop(keys).tolist() == numpy.drop(keys).tolist()
    for name in ("resident", "pending", "count"):
        assert np.array_equal(getattr(native, name), getattr(numpy, name)), name
    assert native.policy.score.tobytes() == numpy.policy.score.tobytes()  # bit for bit
    assert (native.policy.layer, native.policy.t) == (numpy.policy.layer, numpy.policy.t)
    assert native.stats == numpy.stats
    assert (
        native.stats.evictions > 0 and native.stats.wasted_prefetches > 0 and native.stats.prefetch_hits > 0
    )
    assert len(native) == int(native.count.sum()) <= capacity.size * (L if capacity.per_layer else 1)


def test_native_cyclic_errors_match():
    cache = ExpertCache(L, E, CacheCapacity(total=K), Cyclic(L, E))
    with pytest.raises(ValueError, match="expert id 16 out of range for 16 experts"):
        cache.request(0, [1, 16], 0)
    with pytest.raises(ConfigError, match="cache capacity 4 in all is smaller than the 5"):
        cache.request(0, [0, 1, 2, 3, 4], 0)
    cache.request(0, [0, 1], 0)
    with pytest.raises(ConfigError, match="experts of a prefetch and of the layer running"):
        cache.prefetch(1, [0, 1, 2], 0, protect=np.array([0, 1]))
    assert len(cache) == 2 and cache.resident[[0, 1]].all()  # a refused call changed nothing


def test_only_the_cyclic_policy_goes_native():
    assert ExpertCache(L, E, CacheCapacity(total=8), LRU(L * E))._native is None


@pytest.mark.parametrize("native", [True, False])
def test_per_layer_prefetch_counts_the_protected_keys_of_its_own_layer(native):
    """A per-layer cache of one MoE layer prefetches into the layer running: its experts in use
    count against the layer's budget, and are never evicted for the prefetch."""
    cache = ExpertCache(1, 8, CacheCapacity(per_layer=3), Cyclic(1, 8), native=native)
    cache.request(0, [0, 1], 1)
    with pytest.raises(ConfigError, match="smaller than the 4 experts of a prefetch and of the layer"):
        cache.prefetch(0, [2, 3], 1, protect=np.array([0, 1]))
    assert len(cache) == 2 and cache.resident[[0, 1]].all()
    acc = cache.prefetch(0, [2], 1, protect=np.array([0, 1]))
    assert acc.loaded.tolist() == [2] and len(cache) == 3 and cache.resident[[0, 1, 2]].all()
    with pytest.raises(IndexError):
        cache.request(1, [0], 2)  # a layer the cache does not have
