"""Runs the engine on one background thread and hands results to asyncio request handlers.

The engine is plain, single-threaded Python: only this thread touches it. Handlers submit
work and aborts through a locked inbox; each request gets an asyncio.Queue of events that the
engine thread fills with call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from ..engine.engine import Engine
from ..engine.sampling import SamplingParams
from ..engine.sequence import RequestOutput, Sequence
from ..errors import MoeflowError


class Overloaded(MoeflowError):
    """The waiting queue is full; the client should retry later."""


@dataclass
class Event:
    index: int  # which of the request's n choices
    delta: str
    output: RequestOutput | None = None  # set on the last event
    error: str | None = None
    status: int = 400  # of an error: 4xx the request's fault, 5xx the server's

    @property
    def kind(self) -> str:
        """The OpenAI error type of an error event."""
        return "server_error" if self.status >= 500 else "invalid_request_error"


@dataclass
class Handle:
    prompt_ids: list[int]
    params: SamplingParams
    experts_top_k: int | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # shared by the n choices of one HTTP request
    index: int = 0
    seq: Sequence | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None

    def push(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class EngineThread:
    def __init__(self, engine: Engine, max_waiting: int, metrics=None):
        self.engine, self.max_waiting, self.metrics = engine, max_waiting, metrics
        self._inbox: list[Handle] = []
        self._aborts: list[Handle] = []
        self._live: dict[int, Handle] = {}  # request id -> handle, for sequences in the engine
        self._wake = threading.Condition()
        self._stop = False
        self.aborted = 0  # requests dropped because their client went away
        self._thread = threading.Thread(target=self._run, name="moeflow-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting) + len(self._inbox)

    @property
    def running(self) -> int:
        return len(self.engine.running)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        experts_top_k: int | None,
        queue: asyncio.Queue,
        index=0,
    ) -> Handle:
        """Validates now (raising for bad input), queues, and returns the request's handle."""
        self.engine.validate(prompt_ids, experts_top_k)
        handle = Handle(prompt_ids, params, experts_top_k, asyncio.get_running_loop(), queue, index)
        with self._wake:
            if self.waiting >= self.max_waiting:
                raise Overloaded(f"{self.waiting} requests are already waiting; retry later")
            self._inbox.append(handle)
            self._wake.notify()
        return handle

    def abort(self, handle: Handle) -> None:
        with self._wake:
            self._aborts.append(handle)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stop or self._inbox or self._aborts or self.engine.has_work()):
                    self._wake.wait()
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            self._admit(inbox)
            self._drop(aborts)
            try:
                self._step()
            except Exception as e:  # e.g. a checkpoint file truncated under the expert store:
                self._fail_running(f"engine step failed: {e}")  # those requests fail, not the server
            if self.metrics is not None:
                self.metrics.on_step(self)

    def _admit(self, handles: list[Handle]) -> None:
        for h in handles:
            try:
                h.seq = self.engine.add(h.prompt_ids, h.params, None, h.experts_top_k)
                self._live[h.seq.request_id] = h
            except MoeflowError as e:
                h.push(Event(h.index, "", error=str(e)))

    def _drop(self, handles: list[Handle]) -> None:
        for h in handles:
            if h.seq is not None and h.seq.finish_reason is None:
                self.engine.abort(h.seq)
                self._live.pop(h.seq.request_id, None)
                self.aborted += 1

    def _fail_running(self, message: str) -> None:
        for h in self._live.values():
            self.engine.abort(h.seq)
            h.push(Event(h.index, "", error=message, status=500))
        self._live.clear()

    def _step(self) -> None:
        if not self.engine.has_work():
            return
        produced = self.engine.step()
        now = time.perf_counter()
        for seq in produced:
            h = self._live.get(seq.request_id)
            if h is None:
                continue
            if self.metrics is not None:
                self.metrics.on_token(h, now)
            h.first_token = h.first_token or now
            h.last_token = now
            delta = seq.take_delta()
            if seq.finish_reason is None:
                if delta:
                    h.push(Event(h.index, delta))
                continue
            del self._live[seq.request_id]
            out = seq.output()
            if self.metrics is not None:
                self.metrics.on_finish(out)
            h.push(Event(h.index, delta, output=out))
