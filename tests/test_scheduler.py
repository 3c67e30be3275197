"""The continuous-batching scheduler alone: no model, no tensors, a list of slots."""

from __future__ import annotations

from moeflow.engine.sampling import SamplingParams
from moeflow.engine.scheduler import Scheduler
from moeflow.engine.sequence import Sequence


class Slots:
    def __init__(self, n: int, max_len: int):
        self.n_slots, self.max_len = n, max_len
        self.free_list = list(range(n))

    @property
    def free_slots(self) -> int:
        return len(self.free_list)

    def alloc(self) -> int:
        return self.free_list.pop(0)

    def free(self, slot: int) -> None:
        assert slot not in self.free_list, "slot freed twice"
        self.free_list.append(slot)


def seq(i: int, prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(
        i, None, list(range(prompt)), SamplingParams(max_tokens=max_tokens), None, frozenset(), None
    )


def advance(sched: Scheduler, slots: Slots, rows) -> None:
    """What the engine does after a forward step: cache the tokens, emit one where a prompt ended."""
    for s, tokens in rows:
        s.n_cached += len(tokens)
        if s.n_cached >= len(s.prompt_ids):
            s.output_ids.append(7)
            if len(s.output_ids) >= s.params.max_tokens:
                s.finish_reason = "length"
                sched.finish(s, slots)


def test_new_requests_join_the_running_batch_at_the_next_step():
    sched, slots = Scheduler(step_tokens=64, prefill_chunk=64), Slots(4, 128)
    a = seq(0, 5)
    sched.add(a)
    rows = sched.schedule(slots)
    assert [(s.request_id, len(t)) for s, t in rows] == [(0, 5)]
    advance(sched, slots, rows)
    b = seq(1, 3)
    sched.add(b)
    rows = sched.schedule(slots)
    assert [(s.request_id, len(t)) for s, t in rows] == [(0, 1), (1, 3)]  # decode and prefill mixed


def test_decodes_run_first_and_prompts_share_the_token_budget():
    sched, slots = Scheduler(step_tokens=16, prefill_chunk=10), Slots(4, 128)
    a = seq(0, 2, max_tokens=50)
    sched.add(a)
    advance(sched, slots, sched.schedule(slots))
    for i in (1, 2):
        sched.add(seq(i, 30))
    rows = sched.schedule(slots)
    assert [(s.request_id, len(t)) for s, t in rows] == [(0, 1), (1, 10), (2, 5)]
    assert sum(len(t) for _, t in rows) == 16
    advance(sched, slots, rows)
    rows = sched.schedule(slots)
    assert [(s.request_id, len(t)) for s, t in rows] == [(0, 1), (1, 10), (2, 5)]


def test_full_slots_make_requests_wait_and_a_finish_frees_one_at_once():
    sched, slots = Scheduler(), Slots(2, 64)
    seqs = [seq(i, 3, max_tokens=1 if i == 0 else 5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    rows = sched.schedule(slots)
    assert [s.request_id for s, _ in rows] == [0, 1] and list(sched.waiting) == [seqs[2]]
    advance(sched, slots, rows)  # 0 finishes after its first token
    assert seqs[0].finish_reason == "length" and slots.free_slots == 1
    rows = sched.schedule(slots)
    assert [s.request_id for s, _ in rows] == [1, 2] and not sched.waiting


def test_abort_frees_the_slot_wherever_the_request_is():
    sched, slots = Scheduler(), Slots(1, 64)
    a, b = seq(0, 3), seq(1, 3)
    sched.add(a)
    sched.add(b)
    sched.schedule(slots)
    sched.abort(b, slots)  # still waiting
    assert not sched.waiting and b.finish_reason == "abort"
    sched.abort(a, slots)  # running
    assert not sched.running and slots.free_slots == 1 and not sched.has_work()


def test_a_prompt_longer_than_a_slot_grows_the_slots_once_idle():
    sched, slots = Scheduler(), Slots(2, 8)
    grown = []

    def grow(length):
        grown.append(length)
        new = Slots(2, length)
        return new

    sched.add(seq(0, 20, max_tokens=4))
    rows = sched.schedule(slots, grow)
    assert grown == [25] and [len(t) for _, t in rows] == [20]
