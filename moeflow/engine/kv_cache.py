"""KV cache with fixed slots: each running sequence owns one slot of max_len positions.

Every layer stores a tuple of tensors shaped [slots, max_len, ...]: (k, v) for grouped-query
attention, (latent, rotated key) for DeepSeek's latent attention."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.args import ModelArgs
from .batch import StepBatch


class KVCache:
    def __init__(self, layer_shapes: list[list[tuple[int, ...]]], n_slots: int, max_len: int, dtype, device):
        if n_slots <= 0 or max_len <= 0:
            raise ConfigError(f"KV cache needs positive slots and length, got {n_slots} x {max_len}")
        self.n_slots, self.max_len = n_slots, max_len
        self.layers = [
            tuple(torch.zeros(n_slots, max_len, *shape, dtype=dtype, device=device) for shape in shapes)
            for shapes in layer_shapes
        ]
        self._free = list(range(n_slots - 1, -1, -1))

    @classmethod
    def for_model(cls, args: ModelArgs, n_slots: int, max_len: int, dtype, device="cpu") -> KVCache:
        a = args.attention
        if a.kind == "mla":
            shapes = [(a.kv_lora_rank,), (a.qk_rope_head_dim,)]
        else:
            shapes = [(a.n_kv_heads, a.head_dim), (a.n_kv_heads, a.head_dim)]
        return cls([shapes] * args.n_layers, n_slots, max_len, dtype, device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def alloc(self) -> int:
        if not self._free:
            raise ConfigError("KV cache has no free slot")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots or slot in self._free:
            raise ConfigError(f"slot {slot} is not in use")
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def update(self, layer: int, batch: StepBatch, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Writes this step's entries ([T, ...] each) and returns the rows' caches as [B, L, ...]."""
        store = self.layers[layer]
        slot_of_token = batch.slots[batch.row_of_token]
        for t, x in zip(store, new):
            t[slot_of_token, batch.positions] = x.to(t.dtype)
        return tuple(self._read(t, batch) for t in store)

    def _read(self, t: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        length = batch.l_max
        if batch.n_rows == 1:
            s = int(batch.slots[0])
            return t[s : s + 1, :length]
        return t[batch.slots, :length]
