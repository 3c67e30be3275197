"""Routing as pure functions: router logits [T, E] -> (weights [T, K] fp32, expert ids [T, K]).

Each family binds its parameters with functools.partial; `top_k` stays a call argument so a
request can run fewer experts than the model was trained with."""

import torch


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral (renormalise), Qwen-MoE and OLMoE (renormalise iff norm_topk_prob)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _group_mask(scores: torch.Tensor, n_group: int, topk_group: int, group_by: str) -> torch.Tensor:
    """Keeps only the experts of the topk_group best groups; returns a bool mask [T, E]."""
    T, E = scores.shape
    grouped = scores.view(T, n_group, E // n_group)
    group_scores = grouped.max(-1).values if group_by == "max" else grouped.topk(2, dim=-1).values.sum(-1)
    best = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros(T, n_group, dtype=torch.bool, device=scores.device).scatter_(1, best, True)
    return keep[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)


def softmax_group_topk(
    logits: torch.Tensor, top_k: int, n_group: int, topk_group: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax scores; with n_group > 1 only the best groups (by max score) compete."""
    scores = torch.softmax(logits.float(), dim=-1)
    if n_group > 1:
        scores = scores.masked_fill(~_group_mask(scores, n_group, topk_group, "max"), 0.0)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    return weights * scale, ids


def sigmoid_group_topk(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; the correction bias steers the choice but not the weights;
    groups ranked by the sum of their two best biased scores."""
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        choice = choice.masked_fill(~_group_mask(choice, n_group, topk_group, "top2_sum"), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def topk_sum(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Converted dense models: the top-k experts by router logit, each with weight 1, so the
    layer output is the plain sum of the chosen slices of the original FFN. A stable sort, not
    topk, so that ties (and NaNs, ranked first) order as the native one-call decode orders them
    (kernels/linear.c top_ids): the lower index first."""
    ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    return torch.ones(ids.shape, dtype=torch.float32, device=ids.device), ids


def picks_top_logits(route, has_bias: bool) -> bool:
    """Whether `route` (a routing function, or a partial of one) chooses exactly the top-k
    experts by raw logit: true of softmax and sigmoid scores (monotonic) unless a bias or group
    limits reorder them. Lets a caller that needs only the choice (prefetch look-ahead) skip the
    scoring."""
    func = getattr(route, "func", route)
    groups = getattr(route, "keywords", {}).get("n_group", 1)
    if func in (softmax_topk, topk_sum):
        return True
    if func is softmax_group_topk:
        return groups <= 1
    return func is sigmoid_group_topk and groups <= 1 and not has_bias
