"""Held-out NLL of a converted MoE whose routing a benchmark changes between runs: the model, the
first tokens of builtin:evaluation, and its MoE blocks to modify, then the mean NLL as it stands."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.corpus import read_text
from moeflow.eval.windows import run_windows, split
from moeflow.loader.load import load
from moeflow.loader.open import open_model
from moeflow.tokenizer import encode


def load_moe(model: str, tokens: int):
    """-> (the loaded model, its held-out token ids, its MoE blocks in layer order)"""
    lm = load(model, progress=False)
    ids = encode(open_model(model, progress=False)[1], read_text("builtin:evaluation"))[:tokens]
    return lm, ids, [layer.mlp for layer in lm.model.model.layers if layer.is_moe]


def mean_nll(lm, ids: list[int], window: int = 512) -> float:
    """Nats per predicted token, fp32, over windows of `window` tokens."""
    total = count = 0
    for out in run_windows(lm, split(ids, window), torch.float32, progress=False):
        target = torch.tensor(out.tokens[1:])
        total += F.cross_entropy(out.logits[:-1], target, reduction="sum").item()
        count += len(target)
    return total / count
