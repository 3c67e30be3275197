"""`moeflow generate`: streams tokens to stdout, then a one-line summary on stderr."""

from __future__ import annotations

import json
import sys

from ..engine.sampling import SamplingParams
from ..engine.sequence import RequestOutput
from ..llm import LLM
from .format import human, llm_from_args


def run(a) -> int:
    params = SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        stop=a.stop,
        ignore_eos=a.ignore_eos,
    )
    llm = llm_from_args(a)
    prompt = [{"role": "user", "content": a.chat}] if a.chat else a.prompt
    if a.json:
        out = llm.generate(prompt, params, experts_top_k=a.experts_top_k)[0]
        print(json.dumps(as_dict(out) | {"expert_store": llm.expert_stats()}, indent=2))
        return 0
    if not a.chat:
        sys.stdout.write(a.prompt)
    stream = llm.stream(prompt, params, a.experts_top_k)
    while True:
        try:
            sys.stdout.write(next(stream))
            sys.stdout.flush()
        except StopIteration as done:
            out = done.value
            break
    sys.stdout.write("\n")
    print(summary(out, llm), file=sys.stderr)
    store = llm.expert_stats()
    if store:
        print(store_summary(store), file=sys.stderr)
    return 0


def summary(out: RequestOutput, llm: LLM) -> str:
    s = out.stats
    n_moe = len(llm.args.moe_layers)
    return (
        f"--- {len(out.token_ids)} tokens, finish: {out.finish_reason} | "
        f"prefill {s.prefill_tokens} tok at {s.prefill_tps:.1f} tok/s | decode {s.decode_tps:.1f} tok/s | "
        f"params {human(s.total_params)} total, {human(s.active_params)} active per token "
        f"({100 * s.active_params / s.total_params:.1f}%) | experts used {100 * s.active_expert_share:.0f}% "
        f"of {n_moe}x{llm.args.moe.n_experts}"
    )


def store_summary(r: dict) -> str:
    pr = (
        ""
        if r["precision"] is None
        else f" | {r['predictor']} precision {r['precision']:.2f} recall {r['recall']:.2f}"
    )
    return (
        f"--- experts {r['policy']} cache {r['capacity']} ({human(r['budget_bytes'], 'B')}) | "
        f"hit rate {100 * r['hit_rate']:.1f}% | read {human(r['bytes_read'], 'B')} ({r['read_mode']}) | "
        f"stalled on I/O {r['stall_s']:.2f} s, store work {r['store_s'] - r['stall_s']:.2f} s{pr}"
    )


def as_dict(out: RequestOutput) -> dict:
    s = out.stats
    return {
        "text": out.text,
        "token_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "prompt_tokens": len(out.prompt_token_ids),
        "stats": {
            "prefill_tokens": s.prefill_tokens,
            "prefill_s": s.prefill_s,
            "prefill_tps": s.prefill_tps,
            "decode_tokens": s.decode_tokens,
            "decode_s": s.decode_s,
            "decode_tps": s.decode_tps,
            "total_params": s.total_params,
            "active_params": s.active_params,
            "active_expert_share": s.active_expert_share,
            "expert_counts": s.expert_counts.tolist(),
        },
    }
