"""Policies by name, built from what each needs; the one place a new policy is registered."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .belady import Belady
from .capacity import CacheCapacity
from .policies import LFU, LRU, Cyclic, Pinned, Policy, Reuse, hot_set

POLICIES = ("lru", "lfu", "pinned", "reuse", "cyclic", "belady")


@dataclass
class PolicyContext:
    """What a policy may need besides its name."""

    n_layers: int
    n_experts: int
    top_k: int
    capacity: CacheCapacity
    profile: np.ndarray | None = None  # [L, E] use counts: pinned's hot set
    future: np.ndarray | None = None  # [T, L, K] the accesses to come: belady (simulator only)
    pin_fraction: float = 0.5  # share of the capacity pinned
    half_life: float = 32.0  # reuse: tokens after which a use counts half
    lfu_halve_every: int | None = None  # lfu: halve every count this often (tokens); None = never


def make_policy(name: str, ctx: PolicyContext) -> Policy:
    n_keys = ctx.n_layers * ctx.n_experts
    if name == "lru":
        return LRU(n_keys)
    if name == "lfu":
        return LFU(n_keys, ctx.lfu_halve_every)
    if name == "reuse":
        return Reuse(n_keys, ctx.half_life)
    if name == "cyclic":
        return Cyclic(ctx.n_layers, ctx.n_experts, ctx.half_life)
    if name == "pinned":
        if ctx.profile is None:
            raise ConfigError("policy pinned needs a usage profile (per-expert counts, e.g. from a trace)")
        return Pinned(hot_set(ctx.profile, ctx.capacity, ctx.top_k, ctx.pin_fraction))
    if name == "belady":
        if ctx.future is None:
            raise ConfigError("policy belady needs the future accesses: it runs only in the simulator")
        return Belady(ctx.future, ctx.n_experts)
    raise ConfigError(f"unknown cache policy {name!r} (known: {', '.join(POLICIES)})")
