"""Parameter accounting from the model geometry: total, active per token, bytes touched."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.args import ModelArgs
from .models.transformer import CausalLM


@dataclass
class ParamCounts:
    total: int
    active: int  # per token at the model's top-k
    non_expert: int  # everything outside routed experts (embedding included)
    per_expert: int
    n_moe_layers: int
    n_experts: int
    top_k: int
    embedding: int

    @property
    def expert_total(self) -> int:
        return self.per_expert * self.n_experts * self.n_moe_layers

    def touched_per_token(self, top_k: int | None = None) -> int:
        """Weights read to decode one token at batch 1: one embedding row, not the whole table."""
        k = top_k or self.top_k
        return self.non_expert - self.embedding + self.n_moe_layers * k * self.per_expert


def count_params(args: ModelArgs) -> ParamCounts:
    with torch.device("meta"):
        model = CausalLM(args, route=None)
    non_expert = sum(p.numel() for p in model.parameters())
    embedding = args.vocab_size * args.hidden
    if args.tie_embeddings:
        non_expert -= embedding  # lm_head shares the embedding's storage
        embedding = 0  # ...and reads all of it for every token
    m = args.moe
    per_expert = 3 * args.hidden * m.intermediate
    n_moe = len(args.moe_layers)
    return ParamCounts(
        total=non_expert + per_expert * m.n_experts * n_moe,
        active=non_expert + per_expert * m.top_k * n_moe,
        non_expert=non_expert,
        per_expert=per_expert,
        n_moe_layers=n_moe,
        n_experts=m.n_experts,
        top_k=m.top_k,
        embedding=embedding,
    )
