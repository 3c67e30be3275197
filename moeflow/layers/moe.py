"""Sparse MoE block: router -> routing function -> grouped experts (+ shared experts)."""

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import LayerCall, layer_usable, native_linear, usable
from ..models.args import MoEArgs
from .experts import run_experts
from .linear import Linear
from .mlp import MLP
from .routing import topk_sum


class Router(nn.Module):
    def __init__(self, n_experts: int, hidden: int, score_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_experts)) if score_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # router logits in fp32 whatever the compute dtype: expert choice is sensitive to rounding
        x, w = x.float(), self.weight.float()
        if x.dim() == 2 and x.shape[0] == 1 and usable(x, w, 1):
            # a decode token: the native dot, the one MoEBlock's one-call path routes with, so
            # that every store picks the same experts bit for bit
            return native_linear(x, w)
        return F.linear(x, w)  # [T, E]


class MoEBlock(nn.Module):
    def __init__(self, m: MoEArgs, hidden: int, route: Callable):
        super().__init__()
        self.m, self.route = m, route
        # converted dense models route by plain top-k of the logits (weight 1): a decode token's
        # routing can then run inside the layer's one native call
        self.routes_natively = getattr(route, "func", route) is topk_sum and not m.score_bias
        # routes natively -> (the store, the weights' addresses, their LayerCall or None)
        self._calls: dict = {}
        self.gate = Router(m.n_experts, hidden, m.score_bias)
        if m.shared_intermediate:
            self.shared_expert = MLP(hidden, m.shared_intermediate)
        if m.shared_gate:
            self.shared_expert_gate = Linear(hidden, 1, bias=False)

    def _route(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.gate.e_score_correction_bias
        return self.route(logits, top_k=k, **({} if bias is None else {"bias": bias}))

    def _route_per_token(self, logits, ks: torch.Tensor, ctx, layer: int):
        """Tokens asking for different k are routed in groups, each exactly as with that k;
        slots beyond a token's k repeat its first expert with weight 0, which adds nothing."""
        k_max = int(ks.max())
        weights = logits.new_zeros(logits.shape[0], k_max)
        ids = torch.zeros(logits.shape[0], k_max, dtype=torch.long, device=logits.device)
        for k in ks.unique().tolist():
            sel = (ks == k).nonzero()[:, 0]
            w, i = self._route(logits[sel], k)
            weights[sel, :k], ids[sel, :k], ids[sel, k:] = w, i, i[:, :1]
            ctx.record(layer, i, sel)
        if ctx.routes is not None:
            unused = torch.arange(k_max, device=ks.device)[None, :] >= ks[:, None]
            ctx.keep_route(layer, weights, ids.masked_fill(unused, -1))
        return weights, ids

    def forward(self, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        ctx.keep_input(layer, x)
        if self.routes_natively and ctx.row_top_k is None:
            one = self._one_call(x, None, None, ctx.experts, layer, ctx)
            if one is not None:
                return one
        logits = self.gate(x)
        ks = ctx.token_top_k()
        if ks is None:
            weights, ids = self._route(logits, self.m.top_k)
            ctx.record(layer, ids)
            ctx.keep_route(layer, weights, ids)
        else:
            weights, ids = self._route_per_token(logits, ks, ctx, layer)
        if ks is None:
            one = self._one_call(x, weights, ids, ctx.experts, layer)
            if one is not None:
                return one
        on_route = getattr(ctx.experts, "on_route", None)
        if on_route is not None:  # a tiered store starts the next layer's reads now
            on_route(layer, x, ids)
        at_once = getattr(ctx.experts, "at_once", None)  # a budgeted store holds only so many
        staged = getattr(ctx.experts, "fetch_staged", None)  # one whose reads may still be landing
        stage = None if staged is None else (lambda active: staged(layer, active))
        out = run_experts(x, weights, ids, lambda active: ctx.experts.fetch(layer, active), at_once, stage)
        if self.m.shared_intermediate:
            shared = self.shared_expert(x)
            if self.m.shared_gate:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def _one_call(self, x: torch.Tensor, weights, ids, store, layer: int, ctx=None) -> torch.Tensor | None:
        """A decode token whose experts are all resident: routed and shared experts in one native
        call (~2 ms a token less than a call each plus the fetch, on SmolLM2-MoE), with the same
        result. Without weights and ids (plain top-k routing) the call routes too, and the
        routing is recorded in ctx. None where that does not apply."""
        if x.dim() != 2 or x.shape[0] != 1 or x.device.type != "cpu":
            return None
        call = self._layer_call(store, layer, x, native_routing=ids is None)
        if call is None:
            return None
        if ids is None:
            k = self.m.top_k
            weights = torch.ones(1, k)
            ids = torch.empty(1, k, dtype=torch.int64)
        apart = bool(self.m.shared_gate) or x.dtype != torch.float32
        out, sh = call(x, weights[0], ids[0], apart)
        if call.logits is not None:
            ctx.record(layer, ids)
            ctx.keep_route(layer, weights, ids)
        if sh is None:
            return out.to(x.dtype)
        # as the separate calls round: each part to the compute dtype, then the (gated) sum
        sh = sh.to(x.dtype)
        if self.m.shared_gate:
            sh = torch.sigmoid(self.shared_expert_gate(x)) * sh
        return out.to(x.dtype) + sh

    def _layer_call(self, store, layer: int, x: torch.Tensor, native_routing: bool) -> LayerCall | None:
        """The layer's prepared native call for this store (made on first use: a decode pays
        ~20 us a layer for the checks and addresses otherwise), or None where it does not
        apply. Made again if the store or any weight it reads has moved."""
        buffer = getattr(store, "layer_buffer", None)
        if buffer is None:
            return None
        shared = None
        if self.m.shared_intermediate:
            s = self.shared_expert
            if s.gate_proj.bias is not None:
                return None
            shared = (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        router = self.gate.weight if native_routing else None
        experts = buffer(layer)
        where = tuple(
            t.data_ptr() for t in (experts, *(shared or ()), *(() if router is None else (router,)))
        )
        cached = self._calls.get(native_routing)
        if cached is not None and cached[0]() is store and cached[1] == where:
            return cached[2]
        call = None
        routable = router is None or (router.dtype == torch.float32 and router.is_contiguous())
        if routable and layer_usable(x, experts, store.inter, shared):
            call = LayerCall(experts, store.inter, shared, router)
        self._calls[native_routing] = (weakref.ref(store), where, call)
        return call
