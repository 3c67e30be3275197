"""Records every FFN's input on calibration text by running the dense model through moeflow."""

from __future__ import annotations

import torch

from ..eval.windows import run_windows, split
from ..loader.checkpoint import MemoryCheckpoint
from ..loader.load import load
from .dense import DenseModel

WINDOW = 512


def ffn_inputs(
    dense: DenseModel, ids: list[int], max_tokens: int, progress: bool = True
) -> list[torch.Tensor]:
    """Per layer [N, H]: the post-norm hidden states each FFN sees, N ≤ max_tokens."""
    lm = load(MemoryCheckpoint(dense.config, dense.tensors), torch.float32, progress=False)
    seen: list[list[torch.Tensor]] = [[] for _ in lm.model.model.layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda mod, inp, i=i: seen[i].append(inp[0].clone()))
        for i, layer in enumerate(lm.model.model.layers)
    ]
    try:
        windows = split(ids, min(WINDOW, lm.args.max_position), max_tokens)
        for _ in run_windows(lm, windows, progress=progress, desc="calibrating"):
            pass
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]  # outside inference mode: ordinary tensors for autograd
