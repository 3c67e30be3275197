"""Next-layer gate look-ahead: apply MoE layer l+1's router to layer l's MoE input, as soon as
layer l is routed, and prefetch the experts it picks while layer l (and l+1's attention) compute.
The residual stream changes little between adjacent layers, so the guess is usually right; a
wrong guess costs bandwidth, never correctness."""

from __future__ import annotations

import numpy as np
import torch


class LookaheadPredictor:
    name = "lookahead"

    def __init__(self, model, moe_layers: list[int], top_k: int):
        self.blocks = {i: model.model.layers[i].mlp for i in moe_layers}
        self.next = dict(zip(moe_layers, moe_layers[1:]))
        self.top_k = top_k
        self.pending: dict[int, set[int]] = {}

    def observe(self, store, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        used = set(ids[ids >= 0].unique().tolist())
        guess = self.pending.pop(layer, None)
        if guess is not None:
            s = store.stats
            s.predicted, s.used = s.predicted + len(guess), s.used + len(used)
            s.predicted_used += len(guess & used)
        nxt = self.next.get(layer)
        if nxt is None:
            return
        block = self.blocks[nxt]
        with torch.no_grad():
            _, guess_ids = block._route(block.gate(x), self.top_k)
        chosen = _by_votes(guess_ids, store.prefetch_room(nxt))
        store.prefetch(nxt, chosen)
        self.pending[nxt] = set(chosen.tolist())


def _by_votes(ids: torch.Tensor, room: int) -> np.ndarray:
    """The experts most tokens picked, at most `room` of them."""
    flat = ids.reshape(-1).numpy()
    experts, votes = np.unique(flat, return_counts=True)
    return experts[np.argsort(-votes, kind="stable")[:room]]
