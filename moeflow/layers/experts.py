"""The one expert op: tokens grouped by expert, one matmul per active expert over all its tokens."""

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..kernels import ExpertPtrs, experts_usable, native_moe_grouped, native_moe_token
from .linear import linear

# 16-bit experts whose blocks are all below this many tokens take the native grouped kernel
# (bf16 decode of 16 rows: ~80 vs ~65 tok/s); fp32 experts stay on MKL, which measured faster
GROUPED_MAX_ROWS = 16
GROUPED = os.environ.get("MOEFLOW_GROUPED", "1") != "0"
# fp32 experts take it too when small (gate+up under this many weights): per-expert call overhead
# then dominates MKL (SmolLM2-MoE, 4 sequences: 45 vs 34 tok/s, ad-hoc timing); large fp32 experts measured
# faster on MKL
GROUPED_FP32_MAX = 1 << 19

# fetch(expert ids) -> [(w13 [2I, H], w2 [H, I])] in the same order; the store decides where they come from
Fetch = Callable[[Sequence[int]], Sequence[tuple[torch.Tensor, torch.Tensor]]]
# stage(expert ids) -> (weights, positions of those still being read, settle): a store whose
# reads may still be landing (store.cached.CachedExperts.fetch_staged), so that a token computes
# the experts it has while the rest arrive; settle() returns once they have
Stage = Callable[
    [Sequence[int]], tuple[Sequence[tuple[torch.Tensor, torch.Tensor]], list[int], Callable[[], None]]
]


def swiglu_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    if w13.device != x.device:  # the store left this expert where it lives (a device tier's miss
        # computed on the CPU): move the token rows to the weights, not the weights to the rows
        return swiglu_expert(x.to(w13.device), w13, w2).to(x.device)
    gate, up = linear(x, w13).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w2)


def run_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    fetch: Fetch,
    at_once: int | None = None,
    stage: Stage | None = None,
) -> torch.Tensor:
    """x [T, H], weights/ids [T, K] -> sum_k weights[t, k] * expert_{ids[t, k]}(x[t])  [T, H]
    at_once: most experts `fetch` may be asked for in one call (a budgeted store's capacity); a
    batch whose tokens use more runs them in groups of that many. Each expert's rows are computed
    the same way either way, so the result does not depend on it.
    stage: used instead of fetch for a single token (decode), where the fused kernel computes the
    experts already in memory while the others are read, with the same result."""
    if x.shape[0] == 1:
        return _single_token(x, weights[0], ids[0].tolist(), fetch, stage)
    K = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    token_of = order // K
    xs = x[token_of]  # [T*K, H] each token once per expert that picked it
    active, sizes = experts.tolist(), counts.tolist()
    step = at_once or len(active)
    ys = torch.empty_like(xs)
    row, native = 0, None
    for i in range(0, len(active), step):
        part = sizes[i : i + step]
        n = sum(part)
        weights_of = fetch(active[i : i + step])
        if native is None:  # one choice for the whole layer, so groups never change the numerics
            native = _use_native(xs, weights_of[0][0], max(sizes))
        ys[row : row + n] = _grouped(xs[row : row + n], weights_of, part, x.dtype, native)
        row += n
    ys *= weights.reshape(-1)[order, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def _use_native(xs: torch.Tensor, w13: torch.Tensor, most_rows: int) -> bool:
    return (
        GROUPED
        and (w13.dtype != torch.float32 or w13.numel() <= GROUPED_FP32_MAX)
        and most_rows < GROUPED_MAX_ROWS
        and experts_usable(xs, w13)
    )


def _grouped(
    xs: torch.Tensor, weights_of, sizes: list[int], dtype: torch.dtype, native: bool
) -> torch.Tensor:
    """xs [sum(sizes), H]: rows grouped by expert, sizes[i] rows for weights_of[i]."""
    if native:
        return native_moe_grouped(xs, weights_of, sizes).to(dtype)  # one call for the group
    ys = torch.empty_like(xs)
    start = 0
    for n, (w13, w2) in zip(sizes, weights_of):
        ys[start : start + n] = swiglu_expert(xs[start : start + n], w13, w2)
        start += n
    return ys


def _single_token(
    x: torch.Tensor, w: torch.Tensor, ids: list[int], fetch: Fetch, stage: Stage | None
) -> torch.Tensor:
    experts, late, settle = stage(ids) if stage is not None else (fetch(ids), [], None)
    if isinstance(experts, ExpertPtrs):  # a native store step's addresses
        fused = experts.fused_ok(x)
    else:
        fused = experts_usable(x, experts[0][0])
    if fused:  # one fused kernel call for the layer (two if some are late)
        return native_moe_token(x, w, experts, late, settle).to(x.dtype)
    if late:
        settle()
    out = torch.zeros_like(x)
    scale = w.to(x.dtype)
    for k, (w13, w2) in enumerate(experts):
        out.add_(swiglu_expert(x, w13, w2), alpha=float(scale[k]))
    return out
