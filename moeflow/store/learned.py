"""The learned look-ahead: a linear map per MoE layer, fitted on recorded text, from what layer i's
router saw to the logits layer i+1's router will compute.

Plain look-ahead applies router i+1 to layer i's input, as if the residual stream did not move
between them; it moves (layer i's experts and layer i+1's attention write into it), so the guess
is right for 82% of the experts at k guesses and needs two extra guesses per token for 89%
(SmolLM2-MoE E32 K8, held-out text). A ridge regression from x_i to router i+1's true logits,
fitted on 8k calibration tokens, names 92% at k guesses, so the prefetch reads fewer wrong
experts and misses fewer right ones (BENCHMARKS.md). It costs the same at run time: one [E, H]
matrix per layer, as the router.

`moeflow trace` fits it from the text it traces and stores it in the trace file (`lookahead`);
`--prefetch learned --expert-trace TRACE` uses it."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .predict import Lookahead

MAX_FIT_BYTES = 1 << 30  # the normal equations of every layer, float64: beyond, the fit is skipped
RIDGE = 1e-3  # the penalty, relative to the mean of X^T X's diagonal (scale-free)
# how far ahead the maps look: 1 (the next MoE layer) and 2. On SmolLM2-MoE E32 K8, fitted on 8k
# calibration tokens, recall at k guesses on held-out text is 0.92 at depth 1 and 0.90 at depth 2
# (0.89 at depth 3; ad-hoc /tmp script, BENCHMARKS.md)
DEPTHS = (1, 2)


class LookaheadFit:
    """Accumulates, per MoE layer i, the normal equations of the regressions [x_i, 1] ->
    router_{i+d}(x_{i+d}) for d = 1 and 2: X^T X (shared by both depths) and X^T Y in float64,
    so no activation is kept."""

    def __init__(self, routers: list[torch.Tensor]):
        """routers: each MoE layer's router weight [E, H], in layer order."""
        self.routers = [w.detach().float() for w in routers]
        E, H = self.routers[0].shape
        L = len(routers)
        self.xtx = np.zeros((L - 1, H + 1, H + 1))
        self.xty = {d: np.zeros((max(0, L - d), H + 1, E)) for d in DEPTHS}
        self.n = 0

    @staticmethod
    def affordable(n_layers: int, hidden: int) -> bool:
        return (n_layers - 1) * (hidden + 1) ** 2 * 8 <= MAX_FIT_BYTES

    def add(self, inputs: list[torch.Tensor]) -> None:
        """inputs: each MoE layer's router input [n, H] for the same n tokens, in layer order."""
        logits = [torch.nn.functional.linear(x.float(), w).double() for x, w in zip(inputs, self.routers)]
        for i in range(len(inputs) - 1):
            x = inputs[i].double()
            a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            self.xtx[i] += (a.T @ a).numpy()
            for d, xty in self.xty.items():
                if i + d < len(inputs):
                    xty[i] += (a.T @ logits[i + d]).numpy()
        self.n += len(inputs[0])

    def solve(self, depth: int = 1) -> np.ndarray:
        """float32 [L-depth, E, H+1]: row e of layer i's map scores expert e of layer i+depth
        (last column: the bias)."""
        if self.n == 0:
            raise ConfigError("no tokens to fit the learned look-ahead on")
        out = []
        for xtx, xty in zip(self.xtx, self.xty[depth]):
            ridge = RIDGE * np.trace(xtx) / len(xtx) * np.eye(len(xtx))
            out.append(np.linalg.solve(xtx + ridge, xty).T)
        return np.stack(out).astype(np.float32)


class LearnedLookahead(Lookahead):
    """Look-ahead through the fitted maps instead of the next router itself. Its guesses are
    better than plain look-ahead's at k (92% against 82% recall on SmolLM2-MoE), so it guesses
    just k per token by default (margin 0).

    With maps2 (`learned2`) it looks two MoE layers ahead: once layer i is routed it names layer
    i+2's experts, whose reads then have two layers of compute to land in instead of one (where
    the disk is the bottleneck, one layer's compute is about as long as its reads); layer i+1's
    were named by layer i-1, and layer 1's, which has no layer two before it, by layer 0."""

    name = "learned"

    def __init__(
        self,
        model,
        moe_layers: list[int],
        top_k: int,
        n_experts: int,
        maps: np.ndarray,
        margin=0,
        maps2: np.ndarray | None = None,
    ):
        super().__init__(model, moe_layers, top_k, n_experts, margin)
        H = model.model.layers[moe_layers[0]].mlp.gate.weight.shape[1]
        device = model.model.layers[moe_layers[0]].mlp.gate.weight.device
        self.maps = self._split(maps, len(moe_layers) - 1, n_experts, H, device)
        self.maps2 = None if maps2 is None else self._split(maps2, len(moe_layers) - 2, n_experts, H, device)
        if self.maps2 is not None:
            self.name = "learned2"

    @staticmethod
    def _split(maps: np.ndarray, n: int, E: int, H: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if tuple(maps.shape) != (n, E, H + 1):
            raise ConfigError(
                f"the trace's learned look-ahead maps are {list(maps.shape)}; "
                f"this model needs {[n, E, H + 1]}"
            )
        m = torch.from_numpy(np.ascontiguousarray(maps)).to(device)
        return [(m[i, :, :H].contiguous(), m[i, :, H].contiguous()) for i in range(n)]

    def _map(self, li: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.maps[li]

    def next_experts(self, li: int, x: torch.Tensor, ids: torch.Tensor, room: int):
        if self.maps2 is None:
            return super().next_experts(li, x, ids, room)
        out = []
        first = super().next_experts(li, x, ids, room)  # (mostly in already: it fixes the deeper guess)
        if first is not None:
            out.append(first)
        if li + 2 < len(self.blocks):
            out.append((li + 2, self._guess(li + 2, *self.maps2[li], x, room)))
        return out or None
