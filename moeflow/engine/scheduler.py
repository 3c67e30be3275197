"""Continuous batching, as plain Python: which sequences run in the next step and on which tokens.

Every step: admit waiting sequences while a KV slot is free (first come, first served); every
running decode gets its one token; the prompts still being read share what is left of the step's
token budget, in admission order, a chunk each. Decodes go first so a burst of long prompts
delays the running streams by at most one budget's worth of prefill per step, never a whole
prompt. A sequence leaves (and its slot is free for the next admission) the moment it finishes
or is aborted. Nothing here touches a model or a tensor: tests drive it with a list of slots."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from .sequence import Sequence


class Slots(Protocol):
    """KV memory as the scheduler sees it: a fixed number of slots of `max_len` tokens."""

    max_len: int

    @property
    def free_slots(self) -> int: ...

    def alloc(self) -> int: ...

    def free(self, slot: int) -> None: ...


class Scheduler:
    def __init__(self, step_tokens: int = 512, prefill_chunk: int = 512):
        """step_tokens: most tokens one step runs (decodes count 1 each, always run);
        prefill_chunk: most prompt tokens of one sequence in a step."""
        self.step_tokens, self.prefill_chunk = step_tokens, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(
        self, slots: Slots, grow: Callable[[int], Slots] | None = None
    ) -> list[tuple[Sequence, list[int]]]:
        """The next step's rows: (sequence, tokens to feed). grow(length) -> new slots: called,
        while nothing runs, when the next prompt is longer than a slot."""
        self._admit(slots, grow)
        rows = [(s, s.output_ids[-1:]) for s in self.running if s.n_cached >= len(s.prompt_ids)]
        budget = max(1, self.step_tokens - len(rows))  # prompts always advance, if only by a token
        for s in self.running:
            left = len(s.prompt_ids) - s.n_cached
            if left <= 0:
                continue
            n = min(left, self.prefill_chunk, budget)
            if n <= 0:
                break  # the budget is spent: the other prompts go on next step
            rows.append((s, s.prompt_ids[s.n_cached : s.n_cached + n]))
            budget -= n
        return rows

    def _admit(self, slots: Slots, grow) -> None:
        while self.waiting and slots.free_slots:
            need = len(self.waiting[0].prompt_ids) + 1
            if need > slots.max_len:
                if self.running or grow is None:
                    return  # slots grow once the running sequences have finished
                slots = grow(need + self.waiting[0].params.max_tokens)
            seq = self.waiting.popleft()
            seq.slot = slots.alloc()
            self.running.append(seq)

    def finish(self, seq: Sequence, slots: Slots) -> None:
        """seq is done (finish_reason set): its slot is free now."""
        self.running.remove(seq)
        slots.free(seq.slot)

    def abort(self, seq: Sequence, slots: Slots | None) -> None:
        """Drops a request wherever it is and frees its slot at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.finish(seq, slots)
        seq.finish_reason = seq.finish_reason or "abort"
