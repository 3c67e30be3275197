"""How many experts an expert cache holds: a budget per MoE layer, or one budget shared by all."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class CacheCapacity:
    per_layer: int | None = None  # experts resident per MoE layer; layers never compete
    total: int | None = None  # experts resident over all MoE layers; layers compete for slots

    def __post_init__(self):
        if (self.per_layer is None) == (self.total is None):
            raise ConfigError("cache capacity: give exactly one of per_layer and total")
        if self.size < 1:
            raise ConfigError(f"cache capacity must be at least 1 expert, got {self.size}")

    @property
    def scope(self) -> str:
        return "layer" if self.per_layer is not None else "global"

    @property
    def size(self) -> int:
        return self.per_layer if self.per_layer is not None else self.total

    @classmethod
    def of(cls, size: int, scope: str) -> CacheCapacity:
        if scope not in ("layer", "global"):
            raise ConfigError(f"unknown capacity scope {scope!r} (layer, global)")
        return cls(per_layer=size) if scope == "layer" else cls(total=size)

    def describe(self) -> str:
        return f"{self.per_layer}/layer" if self.per_layer is not None else f"{self.total} total"

    def check_fits(self, n_at_once: int, what: str = "experts one token uses in one layer (top-k)") -> None:
        """Every expert of one token's layer must be resident together while that layer runs."""
        if self.size < n_at_once:
            where = "per layer" if self.scope == "layer" else "in all"
            raise ConfigError(
                f"cache capacity {self.size} {where} is smaller than the {n_at_once} {what}, "
                "which must all be resident at once"
            )
