"""Replays a routing trace through an expert cache: hit rate, bytes moved and modelled time.

Tokens replay in trace order, layer by layer, through one ExpertCache that persists across
sequences (as in a server). The first `fit_fraction` of the tokens fits what needs fitting (the
pinned hot set, the learned predictor) and warms the cache; every figure counts the rest only.
Prefetching: the predictor guesses each step's experts `prefetch_depth` steps ahead, and those
not resident are brought in (evicting by the same policy) before the step asks. Time: see timing."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..cache import CacheCapacity, CacheStats, ExpertCache, PolicyContext, make_policy
from ..cache.predictors import PredictionScore, make_predictor, score_predictions
from ..errors import ConfigError
from .timing import IoModel, Timing, replay_time
from .trace import Trace


@dataclass
class SimConfig:
    capacity: CacheCapacity
    policy: str = "lru"
    predictor: str | None = None  # frequency, cooccurrence, oracle; None = no prefetching
    prefetch_depth: int = 1  # layer-steps ahead the prefetch is issued
    prefetch_n: int | None = None  # experts prefetched per step; None = the trace's top-k
    bandwidth_gbs: float = 25.0  # about PCIe 4.0 x16, host to GPU
    expert_bytes: int | None = None  # None = the trace's
    compute_ms: float = 1.0  # per MoE layer per token, all experts resident
    expert_share: float = 0.0  # of compute_ms, the routed experts' (staged timing); 0 = serial
    fit_fraction: float = 0.5
    pin_fraction: float = 0.5  # pinned: share of the capacity held by the hot set
    half_life: float = 32.0  # reuse: tokens after which a use counts half
    window: int = 16  # frequency predictor: tokens looked back
    max_tokens: int | None = None  # replay only the first tokens of the trace

    def __post_init__(self):
        if not 0 <= self.fit_fraction < 1:
            raise ConfigError(f"fit fraction must be in [0, 1), got {self.fit_fraction}")
        if not 0 <= self.pin_fraction <= 1:
            raise ConfigError(f"pin fraction must be in [0, 1], got {self.pin_fraction}")
        if not 0 <= self.expert_share < 1:
            raise ConfigError(f"expert share of compute must be in [0, 1), got {self.expert_share}")
        if self.prefetch_depth < 1:
            raise ConfigError(f"prefetch depth must be at least 1 layer, got {self.prefetch_depth}")
        if self.prefetch_n is not None and self.prefetch_n < 1:
            raise ConfigError(f"experts prefetched per layer must be at least 1, got {self.prefetch_n}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"max tokens must be at least 2, got {self.max_tokens}")

    def check(self, trace: Trace) -> None:
        """What depends on the trace: every expert of a step (and a prefetch beside it) must fit."""
        width, n = trace.width, self.prefetch_n or trace.meta.top_k
        self.capacity.check_fits(width)
        if self.predictor is None:
            return
        if self.prefetch_depth > trace.n_layers:
            raise ConfigError(
                f"prefetch depth {self.prefetch_depth} exceeds the trace's {trace.n_layers} layers"
            )
        held = n if self.capacity.scope == "layer" else n + width  # global: the running layer's stay
        if held > self.capacity.size:
            raise ConfigError(
                f"prefetching {n} experts per layer needs a capacity of at least {held} "
                f"({self.capacity.describe()} given)"
            )


@dataclass
class SimResult:
    policy: str
    predictor: str | None
    capacity: int
    scope: str  # layer (capacity per layer) or global (capacity over all layers)
    first_token: int  # figures count tokens from here on
    tokens: int
    stats: CacheStats
    bytes_moved: int  # (misses + prefetches) x expert bytes
    timing: Timing
    prediction: PredictionScore | None
    wall_s: float

    @property
    def hit_rate(self) -> float:
        return self.stats.hit_rate

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(stats=self.stats.to_dict(), timing=self.timing.to_dict(), hit_rate=self.hit_rate)
        out["prediction"] = self.prediction.to_dict() if self.prediction else None
        return out


@dataclass
class _Steps:
    """Per measured layer-step, in run order: what the timing model needs."""

    misses: np.ndarray  # [S]
    prefetched: np.ndarray  # [S] transfers issued for the step
    waits: np.ndarray  # [S] prefetched experts the step used
    used: np.ndarray  # [S] experts the step used


def simulate(trace: Trace, cfg: SimConfig) -> SimResult:
    started = time.perf_counter()
    if cfg.max_tokens:
        trace = trace.head(cfg.max_tokens)
    cfg.check(trace)
    experts, E = trace.experts, trace.meta.n_experts
    split = int(cfg.fit_fraction * trace.n_tokens)
    cache = ExpertCache(trace.n_layers, E, cfg.capacity, make_policy(cfg.policy, _context(trace, cfg, split)))
    guesses, score = None, None
    if cfg.predictor is not None:
        if split == 0 and cfg.predictor == "cooccurrence":
            raise ConfigError(
                "the cooccurrence predictor is fitted on the first tokens: give a fit fraction > 0"
            )
        predictor = make_predictor(cfg.predictor, experts[:split], E, cfg.window)
        guesses = predictor.predict_trace(experts, cfg.prefetch_n or trace.meta.top_k, cfg.prefetch_depth)
        score = score_predictions(guesses[split:], experts[split:])
    replay = _replay_by_token if cfg.capacity.scope == "layer" else _replay_by_step
    steps = replay(cache, experts, guesses, split, cfg.prefetch_depth)
    expert_bytes = cfg.expert_bytes or trace.meta.expert_bytes
    io = IoModel(cfg.bandwidth_gbs, expert_bytes, cfg.compute_ms, cfg.expert_share)
    tokens = trace.n_tokens - split
    timing = replay_time(
        steps.misses, steps.prefetched, steps.waits, cfg.prefetch_depth, io, tokens, steps.used
    )
    return SimResult(
        policy=cfg.policy,
        predictor=cfg.predictor,
        capacity=cfg.capacity.size,
        scope=cfg.capacity.scope,
        first_token=split,
        tokens=tokens,
        stats=cache.stats,
        bytes_moved=cache.stats.loads * io.expert_bytes,
        timing=timing,
        prediction=score,
        wall_s=time.perf_counter() - started,
    )


def _context(trace: Trace, cfg: SimConfig, split: int) -> PolicyContext:
    return PolicyContext(
        trace.n_layers,
        trace.meta.n_experts,
        trace.width,
        cfg.capacity,
        profile=trace.profile(split or None),  # no fitting part: profiled in-sample
        future=trace.experts,
        pin_fraction=cfg.pin_fraction,
        half_life=cfg.half_life,
    )


def _replay_by_token(cache: ExpertCache, experts, guesses, split: int, depth: int) -> _Steps:
    """Per-layer capacity: the layers of a token never compete, so each token is one batched call.
    Within a layer the order is kept: the prefetch for (t, l) lands after (t-1, l) ran, before (t, l)."""
    T, L, _ = experts.shape
    layers = np.arange(L)
    misses, prefetched = np.zeros((T - split, L), np.int64), np.zeros((T - split, L), np.int64)
    waits = np.zeros((T - split, L), np.int64)
    for t in range(T):
        if t == split:
            cache.stats = CacheStats()
        issued = cache.prefetch_layers(layers, guesses[t], t).misses if guesses is not None else 0
        acc = cache.request_layers(layers, experts[t], t)
        if t >= split:
            misses[t - split], prefetched[t - split], waits[t - split] = (
                acc.misses,
                issued,
                acc.prefetch_hits,
            )
    used = (experts[split:] >= 0).sum(2)  # [T - split, L]
    return _Steps(misses.ravel(), prefetched.ravel(), waits.ravel(), used.ravel())


def _replay_by_step(cache: ExpertCache, experts, guesses, split: int, depth: int) -> _Steps:
    """One global capacity: layers compete, so steps run one at a time, each prefetch issued while
    the step `depth` earlier runs (its experts are in use and stay)."""
    T, L, _ = experts.shape
    S, first = T * L, split * L
    misses, prefetched, waits = np.zeros(S, np.int64), np.zeros(S, np.int64), np.zeros(S, np.int64)
    E = cache.n_experts
    for s in range(S):
        t, layer = divmod(s, L)
        ids = experts[t, layer]
        acc = cache.request(layer, ids, t)
        misses[s], waits[s] = acc.misses[0], acc.prefetch_hits[0]
        if guesses is not None and s + depth < S:
            t2, layer2 = divmod(s + depth, L)
            held = layer * E + ids[ids >= 0].astype(np.int64)
            prefetched[s + depth] = cache.prefetch(layer2, guesses[t2, layer2], t2, protect=held).misses[0]
        if s + 1 == first:  # the prefetches already issued for measured steps belong to them
            cache.stats = CacheStats(prefetches=int(prefetched[first : first + depth].sum()))
    used = (experts >= 0).sum(2).ravel()  # [S]
    return _Steps(misses[first:], prefetched[first:], waits[first:], used[first:])
