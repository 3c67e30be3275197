"""`moeflow trace`: record every token's routing over a text into an .npz trace."""

from __future__ import annotations

import sys
import time

from ..eval.trace import record, save
from .evaluate import add_model_source, open_for_text


def add_parser(sub) -> None:
    t = sub.add_parser("trace", help="record the experts each token chooses in each layer")
    add_model_source(t)
    t.add_argument("--out", required=True, help="trace file (.npz)")


def run(a) -> int:
    t0 = time.perf_counter()
    lm, _, ids = open_for_text(a)
    arrays = record(lm, ids, a.window, a.max_tokens, a.top_k, progress=sys.stderr.isatty())
    save(a.out, arrays)
    T, L, K = arrays["experts"].shape
    print(f"wrote {a.out}: {T} tokens x {L} MoE layers x top-{K} | {time.perf_counter() - t0:.1f} s")
    return 0
