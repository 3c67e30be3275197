"""DeepSeek multi-head latent attention: the cache holds the compressed latent and the shared
rotated key, not per-head keys and values."""

import torch
from torch import nn

from ..models.args import AttentionArgs
from .attention import attend
from .linear import Linear
from .norm import RMSNorm


class LatentAttention(nn.Module):
    def __init__(self, a: AttentionArgs, hidden: int, norm_eps: float):
        super().__init__()
        self.a = a
        h, qk = a.n_heads, a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank is None:
            self.q_proj = Linear(hidden, h * qk, bias=False)
        else:
            self.q_a_proj = Linear(hidden, a.q_lora_rank, bias=a.qkv_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, norm_eps)
            self.q_b_proj = Linear(a.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, a.kv_lora_rank + a.qk_rope_head_dim, bias=a.qkv_bias)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank, norm_eps)
        self.kv_b_proj = Linear(a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        self.o_proj = Linear(h * a.v_head_dim, hidden, bias=a.o_bias)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.a.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        a, T = self.a, x.shape[0]
        nope, rope = a.qk_nope_head_dim, a.qk_rope_head_dim
        q = self._query(x).view(T, a.n_heads, nope + rope)
        q_nope, q_pe = q.split([nope, rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = ctx.rope(q_pe), ctx.rope(k_pe[:, None, :])[:, 0]
        C, KPE = ctx.cache.update(layer, ctx.batch, latent, k_pe)  # [B, L, r], [B, L, rope]
        B, L = C.shape[:2]
        kv = self.kv_b_proj(C).view(B, L, a.n_heads, nope + a.v_head_dim)
        k_nope, v = kv.split([nope, a.v_head_dim], dim=-1)
        k = torch.cat((k_nope, KPE[:, :, None, :].expand(B, L, a.n_heads, rope)), dim=-1)
        out = attend(torch.cat((q_nope, q_pe), dim=-1), k, v, ctx.batch, a.softmax_scale, None)
        return self.o_proj(out)
