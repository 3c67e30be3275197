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


class LookaheadFit:
    """Accumulates, per consecutive pair of MoE layers, the normal equations of the regression
    [x_i, 1] -> router_{i+1}(x_{i+1}): X^T X and X^T Y in float64, so no activation is kept."""

    def __init__(self, routers: list[torch.Tensor]):
        """routers: each MoE layer's router weight [E, H], in layer order."""
        self.routers = [w.detach().float() for w in routers]
        E, H = self.routers[0].shape
        self.xtx = np.zeros((len(routers) - 1, H + 1, H + 1))
        self.xty = np.zeros((len(routers) - 1, H + 1, E))
        self.n = 0

    @staticmethod
    def affordable(n_layers: int, hidden: int) -> bool:
        return (n_layers - 1) * (hidden + 1) ** 2 * 8 <= MAX_FIT_BYTES

    def add(self, inputs: list[torch.Tensor]) -> None:
        """inputs: each MoE layer's router input [n, H] for the same n tokens, in layer order."""
        for i in range(len(inputs) - 1):
            x = inputs[i].double()
            a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            y = torch.nn.functional.linear(inputs[i + 1].float(), self.routers[i + 1]).double()
            self.xtx[i] += (a.T @ a).numpy()
            self.xty[i] += (a.T @ y).numpy()
        self.n += len(inputs[0])

    def solve(self) -> np.ndarray:
        """float32 [L-1, E, H+1]: row e of layer i's map scores expert e of layer i+1 (last
        column: the bias)."""
        if self.n == 0:
            raise ConfigError("no tokens to fit the learned look-ahead on")
        out = []
        for xtx, xty in zip(self.xtx, self.xty):
            ridge = RIDGE * np.trace(xtx) / len(xtx) * np.eye(len(xtx))
            out.append(np.linalg.solve(xtx + ridge, xty).T)
        return np.stack(out).astype(np.float32)


class LearnedLookahead(Lookahead):
    """Look-ahead through the fitted maps instead of the next router itself. Its guesses are
    better than plain look-ahead's at k (92% against 82% recall on SmolLM2-MoE), so it guesses
    just k per token by default (margin 0)."""

    name = "learned"

    def __init__(self, model, moe_layers: list[int], top_k: int, n_experts: int, maps: np.ndarray, margin=0):
        super().__init__(model, moe_layers, top_k, n_experts, margin)
        H = model.model.layers[moe_layers[0]].mlp.gate.weight.shape[1]
        want = (len(moe_layers) - 1, n_experts, H + 1)
        if tuple(maps.shape) != want:
            raise ConfigError(
                f"the trace's learned look-ahead maps are {list(maps.shape)}; this model needs {list(want)}"
            )
        device = model.model.layers[moe_layers[0]].mlp.gate.weight.device
        m = torch.from_numpy(np.ascontiguousarray(maps)).to(device)
        self.maps = [(m[i, :, :H].contiguous(), m[i, :, H].contiguous()) for i in range(len(m))]

    def _map(self, li: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.maps[li]
