"""Run statistics of a tiered expert store, for the API, the CLI summary and benchmark JSON."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StoreStats:
    stall_s: float = 0.0  # time the model waited for expert reads (demand misses + late prefetches)
    # time the model's thread spent in the store, stall_s included: the rest is the store's own
    # work (cache decisions, predictions, submitting reads and taking their completions)
    store_s: float = 0.0
    demand_loads: int = 0
    demand_read_s: float = 0.0  # of the stall, time spent reading demand misses
    predicted: int = 0  # experts a predictor named for a layer
    predicted_used: int = 0  # of those, experts the layer then used
    used: int = 0  # experts layers used while a prediction for them existed

    def report(self, store) -> dict:
        c = store.cache.stats
        return {
            "policy": getattr(store.cache.policy, "name", "?"),
            "capacity": store.cache.capacity.describe(),
            "budget_bytes": store.nbytes,
            "hit_rate": c.hit_rate,
            "hits": c.hits,
            "misses": c.misses,
            "prefetches": c.prefetches,
            "prefetch_hits": c.prefetch_hits,
            "wasted_prefetches": c.wasted_prefetches,
            "bytes_read": store.bytes_moved,
            "read_mode": store.read_mode,
            "demand_bytes": self.demand_loads * store.load_nbytes,
            "demand_read_s": self.demand_read_s,
            "stall_s": self.stall_s,
            "store_s": self.store_s,
            "predictor": getattr(store.predictor, "name", None),
            "precision": self.predicted_used / self.predicted if self.predicted else None,
            "recall": self.predicted_used / self.used if self.used else None,
        }
