"""Expert cache and eviction policies: hand-computed sequences, Belady as the bound, invariants."""

import numpy as np
import pytest

from moeflow.cache import POLICIES, CacheCapacity, ExpertCache, PolicyContext, make_policy
from moeflow.cache.policies import Reuse, hot_set
from moeflow.errors import ConfigError
from moeflow.sim.synthetic import SyntheticSpec, synthetic_trace

# Silberschatz's reference string: with 3 frames LRU faults 12 times, the optimal policy 9 times
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def one_layer(seq: list[int]) -> np.ndarray:
    return np.array(seq, dtype=np.int16).reshape(-1, 1, 1)  # [T, 1, 1]


def build(name: str, experts: np.ndarray, n_experts: int, capacity: CacheCapacity) -> ExpertCache:
    T, L, K = experts.shape
    profile = np.stack(
        [np.bincount(experts[:, i][experts[:, i] >= 0], minlength=n_experts) for i in range(L)]
    )
    ctx = PolicyContext(L, n_experts, K, capacity, profile=profile, future=experts)
    return ExpertCache(L, n_experts, capacity, make_policy(name, ctx))


def replay(cache: ExpertCache, experts: np.ndarray) -> ExpertCache:
    """Step by step, checking the invariants after every request."""
    T, L, _ = experts.shape
    cap = cache.capacity
    for t in range(T):
        for layer in range(L):
            before = cache.stats.accesses
            acc = cache.request(layer, experts[t, layer], t)
            used = experts[t, layer][experts[t, layer] >= 0]
            assert cache.resident[layer * cache.n_experts + used].all()  # the whole step is resident
            assert cache.stats.accesses - before == len(used) == acc.hits.sum() + acc.misses.sum()
            assert cache.stats.hits + cache.stats.misses == cache.stats.accesses
            counts = np.bincount(np.flatnonzero(cache.resident) // cache.n_experts, minlength=L)
            assert (counts == cache.count).all()
            if cap.per_layer is not None:
                assert counts.max() <= cap.per_layer
            else:
                assert counts.sum() <= cap.total
    return cache


@pytest.mark.parametrize("name, misses", [("lru", 12), ("belady", 9)])
def test_textbook_sequence(name, misses):
    cache = replay(build(name, one_layer(TEXTBOOK), 8, CacheCapacity(per_layer=3)), one_layer(TEXTBOOK))
    assert cache.stats.misses == misses
    assert cache.stats.evictions == misses - 3


def test_lfu_keeps_counts_and_breaks_ties_by_recency():
    seq = [0, 0, 1, 2, 0, 1, 1, 2]
    # t3: 1 (once) goes, not 0 (twice); t5: 1 comes back with its count 2 and 2 (once) goes;
    # t7: 0 and 1 both used 3 times, 0 less recently, so 0 goes
    lfu = replay(build("lfu", one_layer(seq), 4, CacheCapacity(per_layer=2)), one_layer(seq))
    assert (lfu.stats.hits, lfu.stats.misses) == (3, 5)
    assert set(np.flatnonzero(lfu.resident)) == {1, 2}
    lru = replay(build("lru", one_layer(seq), 4, CacheCapacity(per_layer=2)), one_layer(seq))
    assert (lru.stats.hits, lru.stats.misses) == (2, 6)


def test_lfu_aging_halves_counts():
    policy = make_policy("lfu", PolicyContext(1, 4, 1, CacheCapacity(per_layer=2), lfu_halve_every=10))
    for t in range(4):
        policy.touch(np.array([0]), t)
    policy.touch(np.array([1]), 25)  # two epochs later: 4 -> 1
    assert list(policy.count[:2]) == [1, 1]


def test_pinned_hot_set_never_leaves():
    # expert 0 is the hottest in the profile; LRU would evict it at t3, pinned keeps it
    seq = [0, 1, 2, 3, 0, 0, 0, 0]
    pinned = replay(build("pinned", one_layer(seq), 4, CacheCapacity(per_layer=2)), one_layer(seq))
    lru = replay(build("lru", one_layer(seq), 4, CacheCapacity(per_layer=2)), one_layer(seq))
    assert pinned.stats.misses == 4 and lru.stats.misses == 5


def test_hot_set_sizes():
    profile = np.array([[5, 9, 1, 0], [0, 1, 2, 8]])
    per_layer = hot_set(profile, CacheCapacity(per_layer=3), top_k=1, fraction=0.5).reshape(2, 4)
    assert per_layer.tolist() == [[False, True, False, False], [False, False, False, True]]
    # a global hot set takes the hottest anywhere, and always leaves top-k slots unpinned
    total = hot_set(profile, CacheCapacity(total=4), top_k=2, fraction=1.0).reshape(2, 4)
    assert total.tolist() == [[False, True, False, False], [False, False, False, True]]


def test_reuse_blends_frequency_and_recency():
    p = Reuse(n_keys=4, half_life=4.0)
    for t in range(6):
        p.touch(np.array([0]), t)  # every token up to 5
    p.touch(np.array([1]), 6)  # once, most recently
    p.touch(np.array([2]), 1)  # once, long ago
    rank = p.priority(np.arange(4))
    assert rank[0] > rank[1] > rank[2] > rank[3]  # popular, recent, old, never used
    # the score is log2 of the decayed count, shifted by a common t / half_life
    expected = sum(0.5 ** ((6 - t) / 4.0) for t in range(6))
    assert rank[0] - rank[1] == pytest.approx(np.log2(expected))


def random_trace(T: int, L: int, E: int, K: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((T, L, E)), axis=-1)[..., :K].astype(np.int16)


TRACES = {
    "random": random_trace(300, 3, 12, 3, seed=1),
    "synthetic": synthetic_trace(
        SyntheticSpec(n_tokens=300, n_layers=3, n_experts=16, top_k=3, unused=0.2)
    ).experts,
}


@pytest.mark.parametrize("trace", TRACES, ids=str)
@pytest.mark.parametrize(
    "capacity", [CacheCapacity(per_layer=3), CacheCapacity(per_layer=6), CacheCapacity(total=12)]
)
def test_belady_bounds_every_policy(trace, capacity):
    experts = TRACES[trace]
    E = int(experts.max()) + 1
    hits = {name: replay(build(name, experts, E, capacity), experts).stats.hits for name in POLICIES}
    assert all(hits["belady"] >= h for h in hits.values()), hits


def test_batched_layers_match_one_at_a_time():
    experts = TRACES["synthetic"]
    cap = CacheCapacity(per_layer=5)
    for name in POLICIES:
        one = replay(build(name, experts, 16, cap), experts)
        batched = build(name, experts, 16, cap)
        for t in range(len(experts)):
            batched.request_layers(np.arange(3), experts[t], t)
        assert one.stats == batched.stats, name
        assert (one.resident == batched.resident).all(), name


def test_prefetch_counts_hits_and_waste():
    cache = build("lru", one_layer([0]), 4, CacheCapacity(per_layer=2))
    cache.prefetch(0, [1, 2], 0)
    assert cache.stats.prefetches == 2 and cache.stats.accesses == 0
    acc = cache.request(0, [1], 0)  # found prefetched
    assert acc.prefetch_hits[0] == 1 and cache.stats.hits == 1
    cache.request(0, [1], 1)  # a second use is an ordinary hit
    cache.request(0, [3], 2)  # evicts 2, prefetched and never used
    s = cache.stats
    assert (s.prefetch_hits, s.wasted_prefetches, s.hits, s.misses, s.loads) == (1, 1, 2, 1, 3)


def test_global_prefetch_keeps_running_layer():
    cache = build("lru", np.zeros((1, 2, 1), np.int16), 4, CacheCapacity(total=4))
    running = np.array([0, 1])
    cache.request(0, running, 0)  # keys 0, 1: older than anything after, but in use
    cache.prefetch(1, [2, 3], 0, protect=running)  # keys 6, 7: the cache is full
    acc = cache.prefetch(1, [0], 0, protect=running)  # key 4 pushes out 6 (6 and 7 tie: lower first)
    assert acc.evicted.tolist() == [6] and cache.stats.wasted_prefetches == 1
    with pytest.raises(ConfigError, match="smaller than"):
        cache.prefetch(1, [1, 2, 3], 0, protect=running)  # 2 running + 3 > 4


def test_capacity_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        CacheCapacity(per_layer=2, total=4)
    with pytest.raises(ConfigError, match="exactly one"):
        CacheCapacity()
    with pytest.raises(ConfigError, match="at least 1"):
        CacheCapacity(per_layer=0)
    cache = build("lru", one_layer([0]), 8, CacheCapacity(per_layer=2))
    with pytest.raises(ConfigError, match="smaller than the 3 experts of one layer-step"):
        cache.request(0, [0, 1, 2], 0)
    with pytest.raises(ConfigError, match="unknown cache policy 'fifo'"):
        make_policy("fifo", PolicyContext(1, 8, 1, CacheCapacity(per_layer=2)))
    with pytest.raises(ConfigError, match="simulator"):
        make_policy("belady", PolicyContext(1, 8, 1, CacheCapacity(per_layer=2)))


def test_cyclic_does_not_thrash_where_lru_does():
    """Layers run in a cycle; every token uses the same 2 experts per layer and the budget holds
    one expert less than a token's: LRU evicts the least recent keys, those of the layers about
    to run, and misses about half the time; cyclic a few per token."""
    L, E, K = 6, 8, 2
    experts = np.tile(np.array([0, 1], dtype=np.int16), (40, L, 1))  # [T, L, K]
    cap = CacheCapacity(total=L * K - 1)
    lru = replay(build("lru", experts, E, cap), experts).stats
    cyclic = replay(build("cyclic", experts, E, cap), experts).stats
    assert cyclic.misses <= L * K + 2 * 39  # the first token, then a miss or two per token
    assert lru.misses > 2 * cyclic.misses


def test_cyclic_prefers_the_layer_that_runs_next():
    ctx = PolicyContext(4, 4, 1, CacheCapacity(total=4))
    p = make_policy("cyclic", ctx)
    keys = np.arange(16)
    p.touch(keys, 0)  # every expert used once, at token 0
    p.touch(np.array([1 * 4 + 1]), 1)  # now layer 1 runs (on its expert 1)
    rank = p.priority(np.array([0, 4, 8, 12]))  # expert 0 of layers 0..3, equally popular
    assert rank.argmax() == 2  # layer 2 runs next: keep it longest
    assert rank.argmin() == 1  # layer 1 just ran: its next use is furthest


@pytest.mark.parametrize("capacity", [CacheCapacity(per_layer=2), CacheCapacity(total=2)])
def test_repeated_id_is_one_key(capacity):
    """A token running fewer than k experts repeats one id in its slots: one key, loaded once."""
    cache = build("lru", np.zeros((1, 2, 1), np.int16), 4, capacity)
    acc = cache.request(0, [1, 2, 1, -1], 0)
    assert acc.loaded.tolist() == [1, 2] and cache.count.tolist() == [2, 0] and len(cache) == 2
    acc = cache.request(0, [2, 2], 1)
    assert acc.hits[0] == 1 and acc.misses[0] == 0 and cache.stats.accesses == 3
    cache.prefetch(1, [3, 3], 1, protect=[2, 2])  # one global slot: evicts key 1, not in use
    left = [2, 7] if capacity.scope == "global" else [1, 2, 7]
    assert cache.resident.nonzero()[0].tolist() == left and cache.stats.prefetches == 1


def test_all_resident():
    cache = build("lru", np.zeros((1, 2, 1), np.int16), 4, CacheCapacity(total=4))
    cache.request(1, [0, 2], 0)
    assert cache.all_resident(1, [2, 0, -1]) and not cache.all_resident(1, [2, 3])
    assert not cache.all_resident(0, [0]) and cache.all_resident(0, [])
