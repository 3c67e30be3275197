"""Modelled time of a replay: compute per layer, plus expert loads over one serial I/O channel.

Two models, chosen by `IoModel.expert_share`:

Serial (expert_share = 0, the default). Each layer-step (one MoE layer of one token) computes for
`compute_ms`. Before it can start, its demand misses load one after another over a single
channel, each taking expert_bytes / bandwidth. The channel is first-in first-out, so demand loads
queue behind prefetches issued earlier. The prefetch for step s + depth is issued when step s
starts computing: it overlaps with that compute (and the compute of the steps in between). A step
that uses a prefetched expert waits until that prefetch has arrived.

Staged (expert_share > 0), how moeflow's decode runs: a step first computes the part of its work
that is not its routed experts (attention, router; 1 - expert_share of compute_ms). Routing then
issues the demand reads and the prefetch for step s + depth, and the experts already in memory
compute while the misses land; each miss computes once it has arrived. The routed experts'
share is split evenly over the experts a step uses.

In both, time a step waits is a stall; the total is compute plus stalls. Hits cost nothing beyond
compute, and the channel has no setup latency."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class IoModel:
    bandwidth_gbs: float  # slow tier -> fast tier, GB/s (1e9 bytes per second)
    expert_bytes: int  # one expert's weights (gate + up + down)
    compute_ms: float  # one MoE layer of one token with its experts resident
    expert_share: float = 0.0  # of compute_ms, the routed experts'; 0 = loads precede compute

    def __post_init__(self):
        if self.bandwidth_gbs <= 0:
            raise ConfigError(f"bandwidth must be positive, got {self.bandwidth_gbs} GB/s")
        if self.expert_bytes <= 0:
            raise ConfigError(f"expert bytes must be positive, got {self.expert_bytes}")
        if self.compute_ms < 0:
            raise ConfigError(f"compute time per layer must not be negative, got {self.compute_ms} ms")
        if not 0 <= self.expert_share < 1:
            raise ConfigError(f"expert share of compute must be in [0, 1), got {self.expert_share}")

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
    misses: np.ndarray,
    prefetched: np.ndarray,
    waits: np.ndarray,
    depth: int,
    io: IoModel,
    tokens: int,
    used: np.ndarray | None = None,
) -> Timing:
    """misses, prefetched (transfers issued for that step), waits (prefetched experts the step
    used), used (experts the step used; the staged model needs it): one entry per layer-step, in
    run order."""
    if io.expert_share > 0:
        if used is None:
            raise ValueError("the staged timing model needs the experts each step used")
        return _staged(misses, prefetched, waits, used, depth, io, tokens)
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


def _staged(misses, prefetched, waits, used, depth: int, io: IoModel, tokens: int) -> Timing:
    S, load = len(misses), io.load_ms
    before = io.compute_ms * (1 - io.expert_share)  # attention and router: nothing to overlap
    m, p, w, u = misses.tolist(), prefetched.tolist(), waits.tolist(), used.tolist()
    arrive = [0.0] * S
    now = channel = 0.0
    for s in range(min(depth, S)):  # issued before the measured steps began: queued at time 0
        channel += p[s] * load
        arrive[s] = channel
    for s in range(S):
        routed = now + before
        each = io.compute_ms * io.expert_share / max(u[s], 1)
        done = routed + (u[s] - m[s] - w[s]) * each  # the experts already in memory
        if w[s]:  # prefetched ones, once the last read issued for this step has landed
            done = max(done, arrive[s]) + w[s] * each
        channel = max(channel, routed)
        for _ in range(m[s]):  # the misses, each as it lands
            channel += load
            done = max(done, channel) + each
        ahead = s + depth
        if ahead < S and p[ahead]:  # issued at routing, behind this step's demand reads
            channel += p[ahead] * load
            arrive[ahead] = channel
        now = done if u[s] else routed + io.compute_ms * io.expert_share
    compute = S * io.compute_ms
    return Timing(now, compute, now - compute, tokens)
