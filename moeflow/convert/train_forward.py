"""A batched, differentiable forward of a dense Llama whose FFNs are supplied by the caller.

The inference engine is built for decoding (paged KV cache, no autograd); end-to-end distillation
needs whole windows at once with gradients, so this is a plain functional forward over the
dense model's (frozen) tensors. Its logits equal transformers' (tests/test_finetune.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..layers.rope import Rotary
from ..models.llama import args_from_config
from .dense import DenseModel

FFN = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, normed hidden [N, H]) -> [N, H]


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class LlamaForward:
    def __init__(self, dense: DenseModel, train_attention: bool = False):
        """train_attention: the attention projections become trainable copies (`trainable`), the
        dense model's tensors stay untouched (they are the teacher's)."""
        self.args = args_from_config(dense.config)
        self.t = dict(dense.tensors)
        self.trainable: dict[str, torch.nn.Parameter] = {}
        if train_attention:
            for i in range(self.args.n_layers):
                for n in ATTENTION:
                    for kind in ("weight", "bias"):
                        name = f"model.layers.{i}.self_attn.{n}.{kind}"
                        if name in self.t:
                            self.trainable[name] = torch.nn.Parameter(self.t[name].clone())
            self.t.update(self.trainable)
        self.rotary = Rotary(self.args.attention.rope)
        self.lm_head = self.t.get("lm_head.weight", self.t["model.embed_tokens.weight"])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.t[name], self.args.norm_eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.t[name + ".weight"], self.t.get(name + ".bias"))

    def _attention(self, i: int, x: torch.Tensor, cos, sin) -> torch.Tensor:
        a = self.args.attention
        p = f"model.layers.{i}.self_attn."
        B, T, _ = x.shape
        q = self._linear(x, p + "q_proj").view(B, T, a.n_heads, a.head_dim)
        k = self._linear(x, p + "k_proj").view(B, T, a.n_kv_heads, a.head_dim)
        v = self._linear(x, p + "v_proj").view(B, T, a.n_kv_heads, a.head_dim)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self._linear(o.transpose(1, 2).reshape(B, T, -1), p + "o_proj")

    def hidden(self, ids: torch.Tensor, ffn: FFN) -> torch.Tensor:
        """ids [B, T] (each row a window starting at position 0) -> final normed hidden [B, T, H]."""
        B, T = ids.shape
        cos, sin = self.rotary.cos_sin(torch.arange(T), torch.float32)
        h = F.embedding(ids, self.t["model.embed_tokens.weight"])
        for i in range(self.args.n_layers):
            p = f"model.layers.{i}."
            h = h + self._attention(i, self._norm(h, p + "input_layernorm.weight"), cos, sin)
            x = self._norm(h, p + "post_attention_layernorm.weight")
            h = h + ffn(i, x.reshape(B * T, -1)).view(B, T, -1)
        return self._norm(h, "model.norm.weight")

    def logits(self, ids: torch.Tensor, ffn: FFN) -> torch.Tensor:
        return self.hidden(ids, ffn) @ self.lm_head.T

    def dense_ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{i}.mlp."
        g, u, d = (self.t[p + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
