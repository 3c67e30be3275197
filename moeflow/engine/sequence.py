"""One request's state while it runs, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .sampling import SamplingParams


@dataclass
class RequestStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0  # tokens generated after the first one
    decode_s: float = 0.0
    total_params: int = 0
    active_params: int = 0  # per token, with the model's default top-k
    expert_counts: np.ndarray | None = None  # [n_layers, n_experts]: tokens routed to each expert

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def active_expert_share(self) -> float:
        """Share of (layer, expert) pairs that received at least one token, over MoE layers."""
        c = self.expert_counts
        if c is None:
            return 0.0
        moe_rows = c.sum(axis=1) > 0
        return float((c[moe_rows] > 0).mean()) if moe_rows.any() else 0.0


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while running
    stats: RequestStats


@dataclass
class Sequence:
    request_id: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    counts: np.ndarray
    detok: object = None
    experts_top_k: int | None = None  # None: the model's own top-k
    slot: int = -1
    n_cached: int = 0  # tokens already in the KV cache
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already handed to a stream
    finish_reason: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)

    def take_delta(self) -> str:
        """New text for a stream. While running, holds back a tail that could still turn out to
        be the start of a stop string."""
        hold = 0 if self.finish_reason else max((len(x) for x in self.params.stop), default=1) - 1
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted : end], end
        return delta

    def output(self) -> RequestOutput:
        self.stats.expert_counts = self.counts
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            stats=self.stats,
        )
