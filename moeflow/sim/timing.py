"""Modelled time of a replay: compute per layer, plus expert loads over one serial I/O channel.

The model. Each layer-step (one MoE layer of one token) computes for `compute_ms`. Before it can
start, its demand misses load one after another over a single channel, each taking
expert_bytes / bandwidth. The channel is first-in first-out, so demand loads queue behind
prefetches issued earlier. The prefetch for step s + depth is issued when step s starts computing:
it overlaps with that compute (and the compute of the steps in between). A step that uses a
prefetched expert waits until that prefetch has arrived. Time a step waits is a stall; the total
is compute plus stalls. Hits cost nothing beyond compute, and the channel has no setup latency."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class IoModel:
    bandwidth_gbs: float  # slow tier -> fast tier, GB/s (1e9 bytes per second)
    expert_bytes: int  # one expert's weights (gate + up + down)
    compute_ms: float  # one MoE layer of one token with its experts resident

    def __post_init__(self):
        if self.bandwidth_gbs <= 0:
            raise ConfigError(f"bandwidth must be positive, got {self.bandwidth_gbs} GB/s")
        if self.expert_bytes <= 0:
            raise ConfigError(f"expert bytes must be positive, got {self.expert_bytes}")
        if self.compute_ms < 0:
            raise ConfigError(f"compute time per layer must not be negative, got {self.compute_ms} ms")

    @property
    def load_ms(self) -> float:
        return self.expert_bytes / (self.bandwidth_gbs * 1e9) * 1e3


@dataclass
class Timing:
    total_ms: float
    compute_ms: float
    stall_ms: float  # waiting for loads that compute did not hide
    tokens: int

    @property
    def ms_per_token(self) -> float:
        return self.total_ms / self.tokens if self.tokens else 0.0

    @property
    def slowdown(self) -> float:
        """Total over compute alone: 1.0 is as fast as with every expert resident."""
        return self.total_ms / self.compute_ms if self.compute_ms else float("inf")

    def to_dict(self) -> dict:
        return asdict(self) | {"ms_per_token": self.ms_per_token, "slowdown": self.slowdown}


def replay_time(
    misses: np.ndarray, prefetched: np.ndarray, waits: np.ndarray, depth: int, io: IoModel, tokens: int
) -> Timing:
    """misses, prefetched (transfers issued for that step), waits (it used a prefetched expert):
    one entry per layer-step, in run order."""
    S, load, compute = len(misses), io.load_ms, io.compute_ms
    if not prefetched.any():
        stall = float(misses.sum()) * load  # nothing in flight: each step's loads alone on the channel
        return Timing(S * compute + stall, S * compute, stall, tokens)
    m, p, w = misses.tolist(), prefetched.tolist(), waits.tolist()
    arrive = [0.0] * S
    now = channel = stall = 0.0
    for s in range(min(depth, S)):  # issued before the measured steps began: queued at time 0
        channel += p[s] * load
        arrive[s] = channel
    for s in range(S):
        start = now
        if m[s]:
            channel = max(channel, now) + m[s] * load
            start = channel
        elif w[s]:
            start = max(now, arrive[s])
        stall += start - now
        ahead = s + depth
        if ahead < S and p[ahead]:
            channel = max(channel, start) + p[ahead] * load
            arrive[ahead] = channel
        now = start + compute
    return Timing(now, S * compute, stall, tokens)
