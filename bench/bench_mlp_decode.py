"""A decode token's native one-call paths against what they replace, paired in one process: the
same model decodes the same prompt with each path in turn, alternating which goes first, and the
ratio is taken round by round.

--path mlp: SwiGLU FFNs (dense layers, shared experts) in one call against the three linears.
--path moe-layer: a MoE layer's routed and shared experts in one call (MoEBlock._one_call)
against a call for the routed experts, one for the shared expert, and the store's fetch.

    .venv/bin/python bench/bench_mlp_decode.py --model dense --dtype bfloat16 --rounds 10
    .venv/bin/python bench/bench_mlp_decode.py --model ~/.cache/moeflow/smollm2-135m-moe-e16s2k10-v2
    .venv/bin/python bench/bench_mlp_decode.py --path moe-layer \
        --model ~/.cache/moeflow/smollm2-135m-moe-e16s2k10-v2
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import moeflow.layers.mlp as mlp
from moeflow import LLM, SamplingParams
from moeflow.default_model import smollm2_gguf
from moeflow.errors import MoeflowError
from moeflow.layers.moe import MoEBlock


def patches(path: str):
    """name -> a function that switches the model to that path; the native one first."""
    if path == "mlp":
        native = mlp.mlp_usable
        return {
            "native": lambda: setattr(mlp, "mlp_usable", native),
            "linears": lambda: setattr(mlp, "mlp_usable", lambda *_: False),
        }
    one_call = MoEBlock._one_call
    return {
        "native": lambda: setattr(MoEBlock, "_one_call", one_call),
        "separate": lambda: setattr(MoEBlock, "_one_call", lambda *_: None),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dense", help="a checkpoint, or dense: the SmolLM2 GGUF")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--path", choices=["mlp", "moe-layer"], default="mlp")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        llm = LLM(str(smollm2_gguf()) if a.model == "dense" else a.model, dtype=a.dtype)
    except MoeflowError as e:  # a wrong path, a broken checkpoint: one line, not a traceback
        raise SystemExit(f"bench_mlp_decode: {e}") from None
    sp = SamplingParams(max_tokens=a.tokens, temperature=0.0, seed=0, ignore_eos=True)
    prompt = "The history of the city begins"
    paths = patches(a.path)
    other = list(paths)[1]
    tps: dict[str, list[float]] = {k: [] for k in paths}
    tokens = {}
    llm.generate([prompt], sp)  # warm-up
    for r in range(a.rounds):
        for name in paths if r % 2 == 0 else reversed(paths):
            paths[name]()
            out = llm.generate([prompt], sp)[0]
            tps[name].append(out.stats.decode_tps)
            tokens.setdefault(name, out.token_ids)
    ratio = statistics.median(n / o for n, o in zip(tps["native"], tps[other]))
    row = {
        "path": a.path,
        "model": a.model,
        "dtype": a.dtype,
        "decode_tps": {k: statistics.median(v) for k, v in tps.items()},
        "paired_ratio": ratio,
        "same_tokens": tokens["native"] == tokens[other],
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
