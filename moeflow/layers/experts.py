"""The one expert op: tokens grouped by expert, one matmul per active expert over all its tokens."""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..kernels import moe_token_usable, native_moe_token
from .linear import linear

# fetch(expert ids) -> [(w13 [2I, H], w2 [H, I])] in the same order; the store decides where they come from
Fetch = Callable[[Sequence[int]], Sequence[tuple[torch.Tensor, torch.Tensor]]]


def swiglu_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = linear(x, w13).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w2)


def run_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fetch: Fetch) -> torch.Tensor:
    """x [T, H], weights/ids [T, K] -> sum_k weights[t, k] * expert_{ids[t, k]}(x[t])  [T, H]"""
    if x.shape[0] == 1:
        return _single_token(x, weights[0], ids[0].tolist(), fetch)
    K = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    token_of = order // K
    xs = x[token_of]  # [T*K, H] each token once per expert that picked it
    ys = torch.empty_like(xs)
    start = 0
    active = experts.tolist()
    for n, (w13, w2) in zip(counts.tolist(), fetch(active)):
        ys[start : start + n] = swiglu_expert(xs[start : start + n], w13, w2)
        start += n
    ys *= weights.reshape(-1)[order, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def _single_token(x: torch.Tensor, w: torch.Tensor, ids: list[int], fetch: Fetch) -> torch.Tensor:
    experts = fetch(ids)
    if moe_token_usable(x, experts[0][0]):
        return native_moe_token(x, w, experts).to(x.dtype)  # one fused kernel call for the layer
    out = torch.zeros_like(x)
    scale = w.to(x.dtype)
    for k, (w13, w2) in enumerate(experts):
        out.add_(swiglu_expert(x, w13, w2), alpha=float(scale[k]))
    return out
