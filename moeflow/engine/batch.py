"""The layout of one forward step: the new tokens of B sequences packed into one [T] vector.

Dense layers and experts work on the packed tokens; attention unpacks them into a padded
[B, S] view whose mask covers each row's own cache. Prefill and decode rows can mix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepBatch:
    tokens: torch.Tensor  # [T] token ids, rows back to back
    positions: torch.Tensor  # [T] position of each token in its sequence
    row_of_token: torch.Tensor  # [T] row index b of each token
    slots: torch.Tensor  # [B] KV-cache slot of each row
    q_lens: list[int]  # new tokens per row
    ctx_lens: list[int]  # tokens in the cache per row once this step is written
    pad_index: torch.Tensor | None  # [T] flat index into [B * S] (None: every row has S tokens)
    last_index: torch.Tensor  # [B] packed index of each row's last token
    sliding_window: int | None = None
    _masks: dict | None = None
    _lens: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        token_rows: list[list[int]],
        starts: list[int],
        slots: list[int],
        device: torch.device | str = "cpu",
        sliding_window: int | None = None,
    ) -> StepBatch:
        """token_rows[b] are the new tokens of row b, which already has starts[b] tokens cached."""
        q_lens = [len(r) for r in token_rows]
        s_max = max(q_lens)
        flat = [t for r in token_rows for t in r]
        pos = [starts[b] + i for b, n in enumerate(q_lens) for i in range(n)]
        rows = [b for b, n in enumerate(q_lens) for _ in range(n)]
        uniform = all(n == s_max for n in q_lens)
        pad = None if uniform else [b * s_max + i for b, n in enumerate(q_lens) for i in range(n)]
        ends, acc = [], 0
        for n in q_lens:
            acc += n
            ends.append(acc - 1)
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            tokens=as_long(flat),
            positions=as_long(pos),
            row_of_token=as_long(rows),
            slots=as_long(slots),
            q_lens=q_lens,
            ctx_lens=[s + n for s, n in zip(starts, q_lens)],
            pad_index=None if pad is None else as_long(pad),
            last_index=as_long(ends),
            sliding_window=sliding_window,
        )

    @property
    def n_rows(self) -> int:
        return len(self.q_lens)

    @property
    def s_max(self) -> int:
        return max(self.q_lens)

    @property
    def l_max(self) -> int:
        return max(self.ctx_lens)

    @property
    def is_decode(self) -> bool:
        """Every row adds one token."""
        return len(self.q_lens) == self.tokens.shape[0]

    @property
    def lens(self) -> torch.Tensor:
        """[B] int64 ctx_lens (made once per step; every layer's attention reads it)."""
        if self._lens is None:
            self._lens = torch.tensor(self.ctx_lens, dtype=torch.int64)
        return self._lens

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, S, ...]; padded rows are zero."""
        b, s = self.n_rows, self.s_max
        if self.pad_index is None:
            return x.view(b, s, *x.shape[1:])
        out = x.new_zeros(b * s, *x.shape[1:])
        out[self.pad_index] = x
        return out.view(b, s, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [T, ...]"""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.pad_index is None else flat[self.pad_index]

    def attn_mask(self, window: int | None) -> torch.Tensor | None:
        """Boolean [B, 1, S, L]: key j is visible to query i of row b when it is in that row's past.
        None when plain causal attention over the whole cache is exact (one row)."""
        if self._masks is None:
            self._masks = {}
        if window in self._masks:
            return self._masks[window]
        mask = self._make_mask(window)
        self._masks[window] = mask
        return mask

    def _make_mask(self, window: int | None) -> torch.Tensor | None:
        dev = self.tokens.device
        if self.n_rows == 1 and self.q_lens[0] == 1 and (window is None or window >= self.ctx_lens[0]):
            return None
        q_len = torch.tensor(self.q_lens, device=dev)[:, None]  # [B, 1]
        ctx = torch.tensor(self.ctx_lens, device=dev)[:, None]
        i = torch.arange(self.s_max, device=dev)[None, :]  # [1, S]
        qpos = ctx - q_len + i  # [B, S] absolute position of each query
        j = torch.arange(self.l_max, device=dev)[None, None, :]  # [1, 1, L]
        mask = j <= qpos[..., None]
        if window is not None:
            mask &= j > qpos[..., None] - window
        # padded query rows see key 0 only, so softmax stays finite; their output is discarded
        pad_rows = (i >= q_len)[..., None] & (j == 0)
        mask = torch.where((i >= q_len)[..., None], pad_rows, mask)
        return mask[:, None]  # [B, 1, S, L]
