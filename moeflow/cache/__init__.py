"""Expert caching: which (layer, expert) weights stay in the fast tier, and which to fetch ahead.

In the engine, one cache for the expert store, asked before each MoE layer runs:

cache = ExpertCache(L, E, CacheCapacity(per_layer=8), make_policy("reuse", PolicyContext(L, E, k, cap)))
acc = cache.request(layer, ids, t)  # copy acc.loaded in, into the slots acc.evicted freed
cache.prefetch(layer + 1, predictor.predict(layer + 1, t, k), t, protect=running_keys)
"""

from .capacity import CacheCapacity
from .registry import POLICIES, PolicyContext, make_policy
from .state import Access, CacheStats, ExpertCache

__all__ = ["POLICIES", "Access", "CacheCapacity", "CacheStats", "ExpertCache", "PolicyContext", "make_policy"]
