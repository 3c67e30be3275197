"""Grouped-query attention over the packed batch (Mixtral, Qwen-MoE, OLMoE)."""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import DTYPES, native_decode, native_decode_attention
from ..models.args import AttentionArgs
from .linear import Linear
from .norm import RMSNorm


def attend(q, k, v, batch, scale: float, window: int | None) -> torch.Tensor:
    """q: [T, h, d] packed; k, v: [B, L, kv, d] per-row caches -> [T, h * dv]."""
    Q = batch.pad(q).transpose(1, 2)  # [B, h, S, d]
    K, V = k.transpose(1, 2), v.transpose(1, 2)  # [B, kv, L, d]
    mask = batch.attn_mask(window)
    out = F.scaled_dot_product_attention(
        Q, K, V, attn_mask=mask, scale=scale, enable_gqa=Q.shape[1] != K.shape[1]
    )
    out = out.transpose(1, 2)  # [B, S, h, dv]
    return batch.unpad(out.reshape(*out.shape[:2], -1))


def attend_decode(q, k, v, cache, layer: int, batch, scale: float, window: int | None) -> torch.Tensor | None:
    """A decode step (one new token per row) on the CPU in one native call: writes k, v into
    the rows' cache slots and attends ([T, h * d]); None where the native kernel does not apply
    (the caller then writes the cache and attends through torch)."""
    kc, vc = cache.layers[layer][:2]
    if not (
        batch.is_decode
        and q.device.type == "cpu"
        and q.dtype == kc.dtype == vc.dtype
        and q.dtype in DTYPES
        and q.shape[1] % k.shape[1] == 0
        and native_decode() is not None
    ):
        return None
    return native_decode_attention(  # (the batch lives where q does: on the CPU)
        q.contiguous(), k.contiguous(), v.contiguous(), kc, vc, batch.slots, batch.lens, scale, window
    )


class Attention(nn.Module):
    def __init__(self, a: AttentionArgs, hidden: int, norm_eps: float):
        super().__init__()
        self.a = a
        h, kv, d = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = Linear(hidden, h * d, bias=a.qkv_bias)
        self.k_proj = Linear(hidden, kv * d, bias=a.qkv_bias)
        self.v_proj = Linear(hidden, kv * d, bias=a.qkv_bias)
        self.o_proj = Linear(h * d, hidden, bias=a.o_bias)
        if a.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, norm_eps), RMSNorm(d, norm_eps)
        elif a.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(h * d, norm_eps), RMSNorm(kv * d, norm_eps)

    def fuse_qkv(self) -> None:
        """After loading: one [q; k; v] matmul instead of three (fewer weight passes and calls).
        The separate modules go, so the weights are not held twice."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        b = None
        if self.a.qkv_bias:
            b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        self.qkv_proj = Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        self.qkv_proj.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            self.qkv_proj.bias = nn.Parameter(b, requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.a
        if not hasattr(self, "qkv_proj"):
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        return self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)

    def forward(self, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        a, T = self.a, x.shape[0]
        q, k, v = self._qkv(x)
        if a.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if a.clip_qkv is not None:
            q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        q = q.reshape(T, a.n_heads, a.head_dim)
        k = k.reshape(T, a.n_kv_heads, a.head_dim)
        v = v.reshape(T, a.n_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.rope(q), ctx.rope(k)
        out = attend_decode(q, k, v, ctx.cache, layer, ctx.batch, a.softmax_scale, a.sliding_window)
        if out is None:
            K, V = ctx.cache.update(layer, ctx.batch, k, v)
            out = attend(q, K, V, ctx.batch, a.softmax_scale, a.sliding_window)
        return self.o_proj(out)
