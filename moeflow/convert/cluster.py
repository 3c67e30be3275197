"""Balanced clustering of FFN neurons by co-activation: neurons that carry activation on the same
tokens land in the same expert, so a token's activation mass concentrates in few experts."""

from __future__ import annotations

import numpy as np
import torch


def balanced_assign(score: torch.Tensor, size: int) -> torch.Tensor:
    """score [F, C] -> labels [F] with exactly `size` neurons per cluster, filled greedily from the
    most confident (neuron, cluster) pairs down."""
    n, c = score.shape
    assert n == c * size, "every cluster must get the same number of neurons"
    order = torch.argsort(score.flatten(), descending=True).numpy()
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(c, size, dtype=np.int64)
    left = n
    for flat in order:  # stops after ~n·c/2 pairs in the worst case; 1536x32 takes ~20 ms
        i, j = divmod(int(flat), c)
        if labels[i] < 0 and room[j]:
            labels[i], room[j] = j, room[j] - 1
            left -= 1
            if not left:
                break
    return torch.from_numpy(labels)


def balanced_kmeans(features: torch.Tensor, n_clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Spherical k-means with a balanced assignment step. features [F, D]; returns labels [F]."""
    n = features.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} neurons do not split into {n_clusters} equal clusters")
    x = torch.nn.functional.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:n_clusters]]
    labels = None
    for _ in range(iters):
        new = balanced_assign(x @ centroids.T, n // n_clusters)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return labels


def groups(labels: torch.Tensor, n_clusters: int) -> list[torch.Tensor]:
    """Neuron indices of each cluster, ascending (keeps the original order within an expert)."""
    return [torch.nonzero(labels == c)[:, 0] for c in range(n_clusters)]
