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
