"""`moeflow chat`: an interactive conversation on the terminal (one line per user turn)."""

from __future__ import annotations

import sys

from ..engine.sampling import SamplingParams
from ..errors import PromptError
from .format import llm_from_args


def run(a) -> int:
    llm = llm_from_args(a)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    history = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        stream = _open_stream(llm, history, params, a.experts_top_k)
        if stream is None:
            continue
        reply = []
        for piece in stream:
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def _open_stream(llm, history: list[dict], params, top_k):
    """Starts the reply; forgets the oldest turns while the conversation is longer than the context."""
    while True:
        try:
            stream = llm.stream(history, params, top_k)
            first = next(stream, None)  # the prompt is checked on the first step
            return [] if first is None else _chain(first, stream)
        except PromptError as e:
            first_turn = 1 if history[0]["role"] == "system" else 0
            if len(history) - first_turn <= 1:
                history.pop()
                print(f"moeflow: {e}", file=sys.stderr)
                return None
            del history[first_turn : first_turn + 2]


def _chain(first: str, rest):
    yield first
    yield from rest
