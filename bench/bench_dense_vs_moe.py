"""Decode speed of converted MoE models against their dense source, paired in one process: every
model is loaded once, then each round decodes the same prompt with each model in turn (the order
rotating), and each MoE model's ratio to the dense one is taken round by round. On a VM whose
memory bandwidth drifts by tens of percent within minutes this gives steadier ratios than runs
in separate processes (bench_store.py dense), at the cost of both models sharing the caches.

    .venv/bin/python bench/bench_dense_vs_moe.py --models ~/.cache/moeflow/smollm2-135m-moe-e16s2k10-v2 \\
        --rounds 15 --out bench/results/dense-vs-moe-paired.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from moeflow import LLM, SamplingParams
from moeflow.default_model import default_model_path, smollm2_gguf
from moeflow.errors import MoeflowError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", help="converted checkpoints (default: the built-in model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    paths = {"dense": str(smollm2_gguf())}
    for m in a.models or [str(default_model_path())]:
        paths[Path(m).name] = m
    try:
        llms = {name: LLM(p, dtype=a.dtype, progress=False) for name, p in paths.items()}
    except MoeflowError as e:  # a wrong path, a broken checkpoint: one line, not a traceback
        raise SystemExit(f"bench_dense_vs_moe: {e}") from None
    sp = SamplingParams(max_tokens=a.tokens, temperature=0.0, seed=0, ignore_eos=True)
    prompt = "The history of the city begins"
    names = list(llms)
    tps: dict[str, list[float]] = {n: [] for n in names}
    for llm in llms.values():
        llm.generate([prompt], sp)  # warm-up
    for r in range(a.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tps[name].append(llms[name].generate([prompt], sp)[0].stats.decode_tps)
    rows = []
    for name in names:
        ratios = [m / d for m, d in zip(tps[name], tps["dense"])]
        rows.append(
            {
                "model": name,
                "decode_tps_median": statistics.median(tps[name]),
                "paired_ratio_median": statistics.median(ratios),
                "paired_ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
                "decode_tps": tps[name],
            }
        )
        row = rows[-1]
        print(f"{name:40s} {row['decode_tps_median']:7.2f} tok/s  x{row['paired_ratio_median']:.3f} dense")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"dtype": a.dtype, "tokens": a.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
