"""Guessing which experts a layer will use before it runs, so a prefetch can hide their load.

A step is one layer of one token; steps run layer by layer, then on to the next token's layer 0.
Online interface (`Predictor`, the engine's hook): `observe` what a layer used, `predict` a layer's
experts for a token. The engine's gate look-ahead (the next layer's router applied to the current
hidden state) implements the same two methods. Offline (`predict_trace`): every step of a trace at
once, each from what was known `depth` steps earlier; the simulator and the scoring use it."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from ..errors import ConfigError

PREDICTORS = ("frequency", "cooccurrence", "oracle")


class Predictor(Protocol):
    name: str

    def observe(self, layer: int, ids: np.ndarray, t: int) -> None:
        """Layer `layer` of token t ran on experts `ids` (-1 = unused slot)."""

    def predict(self, layer: int, t: int, n: int) -> np.ndarray:
        """[n] experts layer `layer` of token t will likely use, most likely first."""


class TracePredictor(Protocol):
    name: str

    def predict_trace(self, experts: np.ndarray, n: int, depth: int) -> np.ndarray:
        """[T, L, n] (or [T, L, K]) guesses for experts [T, L, K], each made `depth` steps ahead."""


def top_n(score: np.ndarray, n: int) -> np.ndarray:
    """[..., n] highest-scoring experts, best first; exact ties go to the lower id."""
    rank = score.astype(np.float64) - np.arange(score.shape[-1]) * 1e-9
    top = np.argpartition(-rank, n - 1, axis=-1)[..., :n]
    order = np.argsort(-np.take_along_axis(rank, top, axis=-1), axis=-1)
    return np.take_along_axis(top, order, axis=-1)


class RecentFrequency:
    """The experts a layer used most over the last `window` tokens. Needs no fitting."""

    name = "frequency"

    def __init__(self, n_layers: int, n_experts: int, window: int = 16):
        if window < 1:
            raise ConfigError(f"frequency predictor window must be at least 1 token, got {window}")
        self.n_experts, self.window = n_experts, window
        self.counts = np.zeros((n_layers, n_experts), dtype=np.int64)
        self.history: list[deque] = [deque() for _ in range(n_layers)]

    def observe(self, layer: int, ids: np.ndarray, t: int) -> None:
        ids = np.asarray(ids)
        ids = ids[ids >= 0]
        self.history[layer].append((t, ids))
        self.counts[layer, ids] += 1

    def predict(self, layer: int, t: int, n: int) -> np.ndarray:
        past = self.history[layer]
        while past and past[0][0] < t - self.window:
            self.counts[layer, past.popleft()[1]] -= 1
        return top_n(self.counts[layer], n)

    def predict_trace(self, experts: np.ndarray, n: int, depth: int) -> np.ndarray:
        T, L, _ = experts.shape
        W = self.window
        out = np.empty((T, L, n), dtype=np.int16)
        for layer in range(L):
            seen = np.cumsum(one_hot(experts[:, layer], self.n_experts), axis=0)  # [T, E] tokens <= t
            counts = np.zeros_like(seen)  # tokens t-W .. t-1
            counts[1:] = seen[:-1]
            counts[W + 1 :] -= seen[: -W - 1]
            out[:, layer] = top_n(counts, n)
        return out


class CoOccurrence:
    """Learned: P(expert e' at a step | expert e at the step before), counted on a training trace.
    The experts of the last known step vote with their conditional distributions, chained through
    the steps in between when predicting further ahead. Layer 0 follows the previous token's last."""

    name = "cooccurrence"

    def __init__(self, transition: np.ndarray, marginal: np.ndarray):
        self.transition = transition  # [L, E, E] row e: distribution at layer l after e one step before
        self.marginal = marginal  # [L, E] each layer's overall distribution: the guess with no evidence
        self.n_layers, self.n_experts = marginal.shape
        self.last: tuple[int, np.ndarray] | None = None  # (step, ids) of the latest observation
        self._chains: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def fit(cls, experts: np.ndarray, n_experts: int, smoothing: float = 1.0) -> CoOccurrence:
        T, L, K = experts.shape
        if T < 2:
            raise ConfigError("cooccurrence predictor needs at least 2 training tokens")
        steps = experts.reshape(T * L, K)
        marginal = np.stack([one_hot(experts[:, layer], n_experts).sum(0) for layer in range(L)]) + 1.0
        marginal /= marginal.sum(1, keepdims=True)
        transition = np.empty((L, n_experts, n_experts))
        for layer in range(L):
            target = np.arange(T) * L + layer
            target = target[target >= 1]
            c = one_hot(steps[target - 1], n_experts).T @ one_hot(steps[target], n_experts)  # [E, E]
            transition[layer] = (c + smoothing * marginal[layer]) / (c.sum(1, keepdims=True) + smoothing)
        return cls(transition, marginal)

    def chain(self, layer: int, depth: int) -> np.ndarray:
        """[E + 1, E]: from the step `depth` before `layer` to `layer`; row E (unused slot) is zero."""
        if (layer, depth) not in self._chains:
            m = np.eye(self.n_experts)
            for d in range(depth - 1, -1, -1):
                m = m @ self.transition[(layer - d) % self.n_layers]
            self._chains[layer, depth] = np.vstack([m, np.zeros(self.n_experts)])
        return self._chains[layer, depth]

    def observe(self, layer: int, ids: np.ndarray, t: int) -> None:
        self.last = (t * self.n_layers + layer, np.asarray(ids))

    def predict(self, layer: int, t: int, n: int) -> np.ndarray:
        gap = t * self.n_layers + layer - self.last[0] if self.last is not None else 0
        if gap < 1:
            return top_n(self.marginal[layer], n)
        return top_n(self._vote(self.chain(layer, gap), self.last[1][None]), n)[0]

    def _vote(self, chain: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """[T, E] summed conditional distributions of the ids [T, K]; slot by slot so that one row
        and many rows add in the same order (online and offline agree to the bit)."""
        rows = np.where(ids >= 0, ids, self.n_experts)
        score = chain[rows[:, 0]].copy()
        for k in range(1, ids.shape[1]):
            score += chain[rows[:, k]]
        return score

    def predict_trace(self, experts: np.ndarray, n: int, depth: int) -> np.ndarray:
        T, L, K = experts.shape
        steps = experts.reshape(T * L, K)
        out = np.empty((T, L, n), dtype=np.int16)
        for layer in range(L):
            source = np.arange(T) * L + layer - depth
            known = source >= 0
            score = np.tile(self.marginal[layer], (T, 1))
            score[known] = self._vote(self.chain(layer, depth), steps[source[known]])
            out[:, layer] = top_n(score, n)
        return out


class Oracle:
    """The experts actually used: the best any predictor can do (simulator only)."""

    name = "oracle"

    def predict_trace(self, experts: np.ndarray, n: int, depth: int) -> np.ndarray:
        return experts


def one_hot(ids: np.ndarray, n_experts: int) -> np.ndarray:
    """[T, K] ids (-1 = none) -> [T, E] float32 with a 1 per chosen expert."""
    out = np.zeros((len(ids), n_experts + 1), dtype=np.float32)
    np.put_along_axis(out, np.where(ids >= 0, ids, n_experts).astype(np.int64), 1.0, axis=1)
    return out[:, :n_experts]


@dataclass
class PredictionScore:
    predicted: int  # experts predicted, summed over steps
    used: int  # experts actually used
    correct: int  # predicted and used

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.used if self.used else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"precision": self.precision, "recall": self.recall}


def score_predictions(predicted: np.ndarray, experts: np.ndarray) -> PredictionScore:
    """predicted [T, L, n] vs experts [T, L, K], -1 = none in either; ids are unique per step."""
    correct = 0
    for layer in range(experts.shape[1]):
        p, a = predicted[:, layer, :, None], experts[:, layer, None, :]
        correct += int(((p == a) & (p >= 0)).sum())
    return PredictionScore(int((predicted >= 0).sum()), int((experts >= 0).sum()), correct)


def make_predictor(name: str, fit: np.ndarray, n_experts: int, window: int = 16) -> TracePredictor:
    """`fit`: [T', L, K] the training part of a trace (the learned predictor is counted on it)."""
    if name == "frequency":
        return RecentFrequency(fit.shape[1], n_experts, window)
    if name == "cooccurrence":
        return CoOccurrence.fit(fit, n_experts)
    if name == "oracle":
        return Oracle()
    raise ConfigError(f"unknown predictor {name!r} (known: {', '.join(PREDICTORS)})")
