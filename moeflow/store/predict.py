"""Prefetch predictors as the engine runs them: after MoE layer i is routed, name the experts
the next MoE layer will likely use, so their reads overlap layer i's compute.

Two kinds behind one method, `next_experts(li, x, ids, room)`:
- look-ahead: apply the next layer's router to this layer's input (the residual stream changes
  little between adjacent layers, so the guess is usually right);
- history: the simulator's trace predictors (`cache.predictors`: recent frequency, or the learned
  co-occurrence model fitted on a recorded trace) fed with what each layer used.
A wrong guess costs bandwidth, never correctness: fetch always waits for the exact experts asked."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .. import kernels
from ..cache.predictors import CoOccurrence, Predictor, RecentFrequency
from ..errors import ConfigError
from ..layers.routing import picks_top_logits
from ..sim.trace import Trace, load_trace

PREDICTORS = ("none", "lookahead", "learned", "frequency", "cooccurrence")
# "auto" (the default): learned where the given trace carries its fitted maps, otherwise none. On
# 2 vCPUs learned beat no prefetch at 10-50% budgets, while lookahead's ~2x bytes cost more than
# the stalls it hides (BENCHMARKS.md, tiered expert store)
ENGINE_PREDICTORS = ("auto", *PREDICTORS)


class EnginePredictor(Protocol):
    name: str

    def next_experts(self, li: int, x: torch.Tensor, ids: torch.Tensor, room: int):
        """MoE layer index li just routed input x [T, H] to ids [T, K] (-1 = unused).
        Returns (next layer index, at most `room` expert ids) or None for no prefetch."""


class Lookahead:
    """Guesses top-(k + margin) per token: the next router scores experts from a slightly stale
    hidden state, so the true k are often just below its k-th place (margin 0: recall 0.84 on
    SmolLM2-MoE E32 K8; see BENCHMARKS.md)."""

    name = "lookahead"

    def __init__(self, model, moe_layers: list[int], top_k: int, n_experts: int, margin: int | None = None):
        self.blocks = [model.model.layers[i].mlp for i in moe_layers]
        self.margin = max(1, top_k // 4) if margin is None else margin
        self.top_k = min(n_experts, top_k + self.margin)
        # routers whose choice is the top logits need no scoring, only one topk (this runs once
        # per layer per token, where each torch call costs several µs)
        self.picks_top = [
            picks_top_logits(b.route, b.gate.e_score_correction_bias is not None) for b in self.blocks
        ]
        self._top = None  # kernels.TopLogits, made on the first decode step that can use it

    def next_experts(self, li: int, x: torch.Tensor, ids: torch.Tensor, room: int):
        if li + 1 >= len(self.blocks):  # the next token's first layer needs that token's state
            return None
        weight, bias = self._map(li)
        if x.shape[0] == 1 and self.picks_top[li + 1] and self._native_ok(x, weight):
            # one decode token's guess in one native call (four torch calls cost ~45 µs a layer)
            return li + 1, self._top(x, weight, bias)[:room]
        with torch.no_grad():
            guess = self._choose(li + 1, torch.nn.functional.linear(x.float(), weight, bias))
        return li + 1, by_votes(guess, room)

    def _map(self, li: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(fp32 weight [E, H], bias or None) that turn layer li's router input into a guess of
        layer li + 1's router logits: here that router itself (Router.forward, minus a module call)."""
        w = self.blocks[li + 1].gate.weight
        return (w if w.dtype == torch.float32 else w.float()), None

    def _native_ok(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        if self._top is None or self._top.k != min(self.top_k, w.shape[0]):  # (_choose may lower top_k)
            if not (w.device.type == "cpu" and w.dtype == torch.float32 and kernels.native() is not None):
                return False
            self._top = kernels.TopLogits(*w.shape, self.top_k)
        return (
            x.device.type == "cpu" and x.is_contiguous() and x.dtype in kernels.DTYPES and w.is_contiguous()
        )

    def _choose(self, nli: int, logits: torch.Tensor) -> torch.Tensor:
        """[T, top_k] experts layer nli would route to with these logits."""
        if self.picks_top[nli]:
            return torch.topk(logits, self.top_k, dim=-1).indices
        block = self.blocks[nli]
        try:
            return block._route(logits, self.top_k)[1]
        except (RuntimeError, ValueError):  # a routing that cannot pick more (group limits)
            self.top_k, self.margin = block.m.top_k, 0
            return block._route(logits, self.top_k)[1]


class History:
    """A trace predictor run online: layer li of step t observed, then asked for the next layer
    (wrapping to the first layer of step t + 1, which this kind can guess too)."""

    def __init__(self, predictor: Predictor, n_layers: int):
        self.p, self.n_layers, self.t = predictor, n_layers, 0
        self.name = predictor.name

    def next_experts(self, li: int, x: torch.Tensor, ids: torch.Tensor, room: int):
        if li == 0:
            self.t += 1
        used = ids[ids >= 0].unique().numpy()
        self.p.observe(li, used, self.t)
        nxt, t = (li + 1, self.t) if li + 1 < self.n_layers else (0, self.t + 1)
        return nxt, self.p.predict(nxt, t, min(room, self.p.n_experts))


def by_votes(ids: torch.Tensor, room: int) -> np.ndarray | list[int]:
    """The experts most tokens picked, at most `room` of them (ties: the lower id)."""
    if ids.shape[0] == 1:  # one token (decode): its experts are distinct already, best first
        return [e for e in ids[0].tolist() if e >= 0][:room]
    flat = ids.reshape(-1).numpy()
    experts, votes = np.unique(flat[flat >= 0], return_counts=True)
    return experts[np.argsort(-votes, kind="stable")[:room]]


def make_engine_predictor(name: str, model, moe_layers: list[int], n_experts: int, top_k: int, trace=None):
    """trace: path of a recorded routing trace of this model (the learned predictor's data)."""
    L = len(moe_layers)
    if name == "none":
        return None
    if name == "lookahead":
        return Lookahead(model, moe_layers, top_k, n_experts)
    if name in ("learned", "auto"):  # auto: learned where the trace has the fitted maps, else none
        from .learned import LearnedLookahead  # (it builds on Lookahead, defined here)

        tr = None if trace is None else model_trace(trace, moe_layers, n_experts)
        if tr is None or tr.lookahead is None:
            if name == "auto":
                return None
            if tr is None:
                raise ConfigError("prefetch learned is fitted by `moeflow trace`: give --expert-trace TRACE")
            raise ConfigError(
                f"trace {trace} holds no learned look-ahead: record it again with this moeflow's `trace`"
            )
        return LearnedLookahead(model, moe_layers, top_k, n_experts, tr.lookahead)
    if name == "frequency":
        return History(RecentFrequency(L, n_experts), L)
    if name == "cooccurrence":
        if trace is None:
            raise ConfigError(
                "prefetch cooccurrence is fitted on a recorded trace: give --expert-trace TRACE"
            )
        return History(CoOccurrence.fit(model_trace(trace, moe_layers, n_experts).experts, n_experts), L)
    raise ConfigError(f"unknown prefetch predictor {name!r} (known: {', '.join(ENGINE_PREDICTORS)})")


def model_trace(path, moe_layers: list[int], n_experts: int) -> Trace:
    """A trace that must have been recorded on a model of this geometry."""
    tr = load_trace(path)
    if tr.meta.moe_layers != list(moe_layers) or tr.meta.n_experts != n_experts:
        raise ConfigError(
            f"trace {path} was recorded on {len(tr.meta.moe_layers)} MoE layers x {tr.meta.n_experts} "
            f"experts; this model has {len(moe_layers)} x {n_experts}"
        )
    return tr
