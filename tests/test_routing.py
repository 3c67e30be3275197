"""Routing functions against brute-force definitions."""

import torch

from moeflow.layers.routing import sigmoid_group_topk, softmax_group_topk, softmax_topk


def logits(t=64, e=16, seed=0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed))


def test_softmax_topk_renormalised_sums_to_one():
    w, ids = softmax_topk(logits(), 4, renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(64))
    w2, ids2 = softmax_topk(logits(), 4, renormalize=False)
    assert torch.equal(ids, ids2) and (w2.sum(-1) < 1).all()


def test_group_limited_picks_only_from_best_groups():
    x = logits()
    _, ids = softmax_group_topk(x, 3, n_group=4, topk_group=2, scale=1.0)
    probs = torch.softmax(x, -1).view(64, 4, 4)
    best_groups = probs.max(-1).values.topk(2, dim=-1).indices  # [T, 2]
    assert all(set((ids[t] // 4).tolist()) <= set(best_groups[t].tolist()) for t in range(64))


def test_sigmoid_bias_steers_choice_not_weights():
    x = logits()
    bias = torch.zeros(16)
    bias[5] = 100.0  # expert 5 always chosen...
    w, ids = sigmoid_group_topk(x, bias, 2, n_group=1, topk_group=1, renormalize=False, scale=1.0)
    assert (ids == 5).any(-1).all()
    # ...but weighted by its unbiased score
    col = (ids == 5).float().argmax(-1)
    assert torch.allclose(w[torch.arange(64), col], torch.sigmoid(x[:, 5]))


def test_picks_top_logits_matches_each_routing_choice():
    """Where picks_top_logits says so, the routing's choice is the top-k logits (the look-ahead
    prefetch relies on it); where a bias or groups reorder them, it must say no."""
    from functools import partial

    from moeflow.layers.routing import picks_top_logits, topk_sum

    x, k = logits(), 4
    bias = torch.randn(16)
    sig = partial(sigmoid_group_topk, topk_group=1, renormalize=True, scale=1.0)
    cases = [
        (partial(softmax_topk, renormalize=True), {}, True),
        (topk_sum, {}, True),
        (partial(softmax_group_topk, n_group=1, topk_group=1, scale=1.0), {}, True),
        (partial(softmax_group_topk, n_group=4, topk_group=2, scale=1.0), {}, False),
        (partial(sig, n_group=1), {"bias": None}, True),
        (partial(sig, n_group=1), {"bias": bias}, False),
        (partial(sig, n_group=4, topk_group=2), {"bias": None}, False),
    ]
    top = torch.topk(x, k, dim=-1).indices.sort(-1).values
    for route, extra, want in cases:
        assert picks_top_logits(route, extra.get("bias") is not None) == want
        _, ids = route(x, top_k=k, **extra)
        if want:
            assert torch.equal(ids.sort(-1).values, top)
        else:  # the claim would be wrong here: some token's choice differs from its top logits
            assert not torch.equal(ids.sort(-1).values, top)
