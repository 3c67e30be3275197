"""Layer-wise distillation: refit each converted layer's down projections so the sparse sum of the
routed experts best reproduces the dense FFN output on calibration tokens.

With routing fixed, the layer output is linear in the down weights, so this is ridge regression
solved in closed form (one F x F system per layer), pulled towards the original weights."""

from __future__ import annotations

import torch


def refit_down(
    acts: torch.Tensor, keep: torch.Tensor, target: torch.Tensor, down: torch.Tensor, ridge: float = 0.3
) -> torch.Tensor:
    """acts [N, F] intermediate activations, keep [N, F] bool (neuron computed for that token),
    target [N, H] dense output, down [H, F] original weights -> refitted down [H, F].
    The ridge weight (relative to the mean Gram diagonal) was tuned on held-out calibration tokens:
    0.3 gave the lowest held-out output error on SmolLM2 layers 3, 12 and 24."""
    z = acts * keep
    gram = z.T @ z  # [F, F]
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    rhs = z.T @ target + lam * down.T  # [F, H]
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram.double(), rhs.double()).T.float().contiguous()
