"""Routers for converted FFNs: which experts carry a token's activation mass, and a linear map
from the FFN input to those experts (heuristic or fitted)."""

from __future__ import annotations

import torch


def expert_mass(importance: torch.Tensor, expert_groups: list[torch.Tensor]) -> torch.Tensor:
    """importance [N, F] -> [N, E]: the activation mass each expert would carry for each token."""
    return torch.stack([importance[:, g].sum(1) for g in expert_groups], dim=1)


def centroid_router(gate: torch.Tensor, expert_groups: list[torch.Tensor]) -> torch.Tensor:
    """No training: an expert's score is its neurons' mean gate pre-activation. [E, H]"""
    return torch.stack([gate[g].mean(0) for g in expert_groups])


def mass_recall(logits: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Share of the best possible top-k activation mass that the router's top-k captures."""
    picked = mass.gather(1, logits.topk(k, dim=1).indices).sum()
    best = mass.topk(k, dim=1).values.sum()
    return float(picked / best)


def fit_router(
    x: torch.Tensor, mass: torch.Tensor, init: torch.Tensor, steps: int = 150, lr: float = 0.02, seed: int = 0
) -> torch.Tensor:
    """Softmax regression of each token's normalised expert mass on its FFN input: the router's
    distribution over experts learns to follow where the activation mass is. Returns [E, H]."""
    x = x.float()
    target = mass / mass.sum(1, keepdim=True).clamp_min(1e-12)
    scale = x.norm(dim=1).mean().item()  # starts from the heuristic, scaled to unit logits
    w = (init / init.norm(dim=1, keepdim=True).clamp_min(1e-12) / max(scale, 1e-6)).clone()
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr / max(scale, 1e-6))
    gen = torch.Generator().manual_seed(seed)
    n, batch = x.shape[0], min(x.shape[0], 4096)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, n, (batch,), generator=gen)
            logp = torch.log_softmax(x[idx] @ w.T, dim=1)
            loss = -(target[idx] * logp).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach()
