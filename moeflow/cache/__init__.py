"""Expert caching: which (layer, expert) weights stay in the fast tier, and which to fetch ahead."""

from .capacity import CacheCapacity
from .registry import POLICIES, PolicyContext, make_policy
from .state import Access, CacheStats, ExpertCache

__all__ = ["POLICIES", "Access", "CacheCapacity", "CacheStats", "ExpertCache", "PolicyContext", "make_policy"]
