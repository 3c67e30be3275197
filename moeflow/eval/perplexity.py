"""Perplexity of a model on a text: exp(mean negative log-likelihood of each next token)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..loader.load import LoadedModel
from .windows import run_windows, split


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood, nats per token
    tokens: int  # predicted tokens (each window's first token has no prediction)
    windows: int
    window: int
    top_k: int | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(
    lm: LoadedModel,
    ids: list[int],
    window: int = 512,
    max_tokens: int | None = None,
    top_k: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Perplexity:
    t0 = time.perf_counter()
    wins = split(ids, window, max_tokens)
    total, count = 0.0, 0
    for out in run_windows(lm, wins, dtype, top_k=top_k, progress=progress, desc="perplexity"):
        target = torch.tensor(out.tokens[1:])
        total += F.cross_entropy(out.logits[:-1], target, reduction="sum").item()
        count += len(target)
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(wins), window, top_k, time.perf_counter() - t0)
