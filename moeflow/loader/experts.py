"""Reads one MoE layer's experts in either on-disk layout:
per expert  (`experts.{e}.gate_proj.weight` [I, H], `up_proj` [I, H], `down_proj` [H, I]) or
fused 3-D   (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I])."""

from collections.abc import Iterator

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint

Expert = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]  # (id, gate, up, down)


def check_shape(name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {name} has shape {tuple(got)}, expected {tuple(want)}")


def layer_experts(
    ckpt: Checkpoint, canon: dict[str, str], layer: int, E: int, I: int, H: int
) -> Iterator[Expert]:
    prefix = f"model.layers.{layer}.mlp.experts"
    if f"{prefix}.gate_up_proj" in canon:
        yield from _fused(ckpt, canon, prefix, E, I, H)
    else:
        yield from _per_expert(ckpt, canon, prefix, E, I, H)


def _fused(ckpt, canon, prefix, E, I, H) -> Iterator[Expert]:
    gu_name, d_name = canon[f"{prefix}.gate_up_proj"], canon.get(f"{prefix}.down_proj")
    if d_name is None:
        raise CheckpointError(f"tensor {prefix}.down_proj is missing from the checkpoint")
    check_shape(gu_name, ckpt.shape(gu_name), (E, 2 * I, H))
    check_shape(d_name, ckpt.shape(d_name), (E, H, I))
    gate_up, down = ckpt.read(gu_name), ckpt.read(d_name)  # copies, not the mmap: one copy at peak
    for e in range(E):
        yield e, gate_up[e, :I], gate_up[e, I:], down[e]


def _per_expert(ckpt, canon, prefix, E, I, H) -> Iterator[Expert]:
    want = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    for e in range(E):
        parts = []
        for proj, shape in want.items():
            key = f"{prefix}.{e}.{proj}.weight"
            name = canon.get(key)
            if name is None:
                raise CheckpointError(f"tensor {key} is missing from the checkpoint")
            check_shape(name, ckpt.shape(name), shape)
            parts.append(ckpt.read(name))
        yield (e, *parts)
