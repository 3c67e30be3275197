"""A decode token's SwiGLU FFNs (dense layers, shared experts) through one native call against
the three linears, paired in one process: the same model decodes the same prompt with each path
in turn, alternating which goes first, and the ratio is taken round by round.

    .venv/bin/python bench/bench_mlp_decode.py --model dense --dtype bfloat16 --rounds 10
    .venv/bin/python bench/bench_mlp_decode.py --model ~/.cache/moeflow/smollm2-135m-moe-e16s2k10-v2
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import moeflow.layers.mlp as mlp
from moeflow import LLM, SamplingParams
from moeflow.default_model import smollm2_gguf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dense", help="a checkpoint, or dense: the SmolLM2 GGUF")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    llm = LLM(str(smollm2_gguf()) if a.model == "dense" else a.model, dtype=a.dtype)
    sp = SamplingParams(max_tokens=a.tokens, temperature=0.0, seed=0, ignore_eos=True)
    prompt = "The history of the city begins"
    paths = {"native": mlp.mlp_usable, "linears": lambda *_: False}
    tps: dict[str, list[float]] = {k: [] for k in paths}
    tokens = {}
    llm.generate([prompt], sp)  # warm-up
    for r in range(a.rounds):
        for name in paths if r % 2 == 0 else reversed(paths):
            mlp.mlp_usable = paths[name]
            out = llm.generate([prompt], sp)[0]
            tps[name].append(out.stats.decode_tps)
            tokens.setdefault(name, out.token_ids)
    ratio = statistics.median(n / lin for n, lin in zip(tps["native"], tps["linears"]))
    row = {
        "model": a.model,
        "dtype": a.dtype,
        "decode_tps": {k: statistics.median(v) for k, v in tps.items()},
        "paired_ratio": ratio,
        "same_tokens": tokens["native"] == tokens["linears"],
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
