"""The decoder every family shares; a family differs only in its args, routing and name mapping."""

from collections.abc import Callable

import torch
from torch import nn

from ..layers.attention import Attention
from ..layers.linear import Linear
from ..layers.mla import LatentAttention
from ..layers.mlp import MLP
from ..layers.moe import MoEBlock
from ..layers.norm import RMSNorm
from .args import ModelArgs


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, idx: int, route: Callable):
        super().__init__()
        self.idx = idx
        attn = LatentAttention if args.attention.kind == "mla" else Attention
        self.self_attn = attn(args.attention, args.hidden, args.norm_eps)
        self.input_layernorm = RMSNorm(args.hidden, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden, args.norm_eps)
        self.is_moe = args.is_moe(idx)
        self.mlp = (
            MoEBlock(args.moe, args.hidden, route) if self.is_moe else MLP(args.hidden, args.intermediate)
        )

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, self.idx)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, ctx, self.idx) if self.is_moe else self.mlp(h))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, route: Callable):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden)
        self.layers = nn.ModuleList(DecoderLayer(args, i, route) for i in range(args.n_layers))
        self.norm = RMSNorm(args.hidden, args.norm_eps)


class CausalLM(nn.Module):
    def __init__(self, args: ModelArgs, route: Callable):
        super().__init__()
        self.args = args
        self.model = Backbone(args, route)
        self.lm_head = Linear(args.hidden, args.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(self, ctx, all_logits: bool = False) -> torch.Tensor:
        """Returns logits [T, V] for every new token, or [B, V] for each row's last token."""
        x = self.model.embed_tokens(ctx.batch.tokens)  # [T, H]
        for layer in self.model.layers:
            x = layer(x, ctx)
        if not all_logits:
            x = x[ctx.batch.last_index]
        return self.lm_head(self.model.norm(x)).float()
