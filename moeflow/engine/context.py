"""Everything one forward step needs besides the weights, passed explicitly through the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layers.rope import Rotary
from .batch import StepBatch
from .kv_cache import KVCache


@dataclass
class ForwardContext:
    batch: StepBatch
    cache: KVCache
    experts: object  # an expert store: fetch(layer, ids) -> [(w13, w2)]
    rotary: Rotary
    dtype: torch.dtype
    row_top_k: list[int] | None = None  # experts per token for each row; None: the model's top-k
    counts: torch.Tensor | None = None  # [B, n_layers, E] experts chosen per row, filled when given
    routes: dict | None = None  # layer -> (weights [T, K], ids [T, K], -1 = unused slot), when given
    inputs: dict | None = None  # layer -> its MoE block's input [T, H] (what its router saw), when given
    _cos_sin: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _picks: list = field(default_factory=list, repr=False)  # record()'s, until tally()

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        if self._cos_sin is None:
            self._cos_sin = self.rotary.cos_sin(self.batch.positions, x.dtype)
        return self.rotary.apply(x, *self._cos_sin)

    def token_top_k(self) -> torch.Tensor | None:
        """[T] experts to run for each token, or None when every token uses the model's top-k."""
        if self.row_top_k is None:
            return None
        ks = torch.tensor(self.row_top_k, device=self.batch.tokens.device)
        return ks[self.batch.row_of_token]

    def record(self, layer: int, ids: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Notes expert picks ids [n, k] of the given packed tokens (default: all of them); they
        are counted once per step by tally() (one bincount a step rather than one a layer,
        ~25 µs each between a decode's kernels)."""
        if self.counts is not None:
            self._picks.append((layer, ids, tokens))

    def tally(self) -> None:
        """Adds the step's recorded picks to counts [B, n_layers, E]."""
        if self.counts is None or not self._picks:
            return
        B, n_layers, E = self.counts.shape
        rows = self.batch.row_of_token
        whole = [(layer, ids) for layer, ids, tokens in self._picks if tokens is None]
        rest = [p for p in self._picks if p[2] is not None]
        keys = []
        if whole and len({ids.shape for _, ids in whole}) == 1:  # every token at one k: one stack
            layers = torch.tensor([layer for layer, _ in whole], device=rows.device)
            ids = torch.stack([ids for _, ids in whole])  # [P, T, k]
            keys.append(((rows[None, :, None] * n_layers + layers[:, None, None]) * E + ids).reshape(-1))
        else:
            rest += [(layer, ids, None) for layer, ids in whole]
        for layer, ids, tokens in rest:
            sel = rows if tokens is None else rows[tokens]
            keys.append(((sel[:, None] * n_layers + layer) * E + ids).reshape(-1))
        self._picks.clear()
        self.counts += torch.bincount(torch.cat(keys), minlength=B * n_layers * E).view(B, n_layers, E)

    def keep_route(self, layer: int, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """Records the routing decision of every token (traces); free when routes is None."""
        if self.routes is not None:
            self.routes[layer] = (weights.detach().cpu(), ids.detach().cpu())

    def keep_input(self, layer: int, x: torch.Tensor) -> None:
        """Records what a MoE layer's router saw (fitting the learned look-ahead); free when None."""
        if self.inputs is not None:
            self.inputs[layer] = x.detach().float().cpu()
