"""Where expert weights live. The model asks a store for (layer, expert) weights and never holds
them as module parameters, so a tiered store can replace this resident one without touching it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import CheckpointError


class ResidentExperts:
    """Every expert in memory. Each expert is one contiguous buffer [gate | up | down] so that a
    cache or a copy engine can move it in one piece; w13 [2I, H] and w2 [H, I] are views into it."""

    def __init__(self, layers: Sequence[int], n_experts: int, hidden: int, inter: int, dtype, device="cpu"):
        self.n_experts, self.hidden, self.inter = n_experts, hidden, inter
        self.expert_numel = 3 * inter * hidden
        self.buffers = {
            layer: torch.empty(n_experts, self.expert_numel, dtype=dtype, device=device) for layer in layers
        }
        self._views = {layer: self._split(buf) for layer, buf in self.buffers.items()}
        # each expert's (w13, w2) views, made on a layer's first fetch: a decode asks for K of
        # them per layer, and indexing anew costs ~1.5 µs a tensor between its kernels
        self._pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _split(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        E, I, H = self.n_experts, self.inter, self.hidden
        return buf[:, : 2 * I * H].view(E, 2 * I, H), buf[:, 2 * I * H :].view(E, H, I)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    @property
    def expert_nbytes(self) -> int:
        buf = next(iter(self.buffers.values()))
        return self.expert_numel * buf.element_size()

    def put(self, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        w13, w2 = self._views[layer]
        I, H = self.inter, self.hidden
        for name, t, want in (("gate", gate, (I, H)), ("up", up, (I, H)), ("down", down, (H, I))):
            if tuple(t.shape) != want:
                raise CheckpointError(
                    f"layer {layer} expert {expert} {name}_proj has shape {tuple(t.shape)}, expected {want}"
                )
        w13[expert, :I].copy_(gate)
        w13[expert, I:].copy_(up)
        w2[expert].copy_(down)

    def layer_buffer(self, layer: int) -> torch.Tensor:
        """[E, 3 * inter * hidden]: every expert of a layer, one row each, [gate | up] rows then
        down, for a kernel that computes a whole layer from one address."""
        return self.buffers[layer]

    def fetch(self, layer: int, experts: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = self._pairs.get(layer)
        if pairs is None:
            w13, w2 = self._views[layer]
            pairs = self._pairs[layer] = list(zip(w13.unbind(), w2.unbind()))
        return [pairs[e] for e in experts]
