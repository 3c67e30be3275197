"""Sparse MoE block: router -> routing function -> grouped experts (+ shared experts)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.args import MoEArgs
from .experts import run_experts
from .linear import Linear
from .mlp import MLP


class Router(nn.Module):
    def __init__(self, n_experts: int, hidden: int, score_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_experts)) if score_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # router logits in fp32 whatever the compute dtype: expert choice is sensitive to rounding
        return F.linear(x.float(), self.weight.float())  # [T, E]


class MoEBlock(nn.Module):
    def __init__(self, m: MoEArgs, hidden: int, route: Callable):
        super().__init__()
        self.m, self.route = m, route
        self.gate = Router(m.n_experts, hidden, m.score_bias)
        if m.shared_intermediate:
            self.shared_expert = MLP(hidden, m.shared_intermediate)
        if m.shared_gate:
            self.shared_expert_gate = Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        logits = self.gate(x)
        extra = (
            {} if self.gate.e_score_correction_bias is None else {"bias": self.gate.e_score_correction_bias}
        )
        weights, ids = self.route(logits, top_k=ctx.top_k or self.m.top_k, **extra)
        ctx.record(layer, ids)
        out = run_experts(x, weights, ids, lambda active: ctx.experts.fetch(layer, active))
        if self.m.shared_intermediate:
            shared = self.shared_expert(x)
            if self.m.shared_gate:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
