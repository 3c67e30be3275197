"""How much each layer of a converted MoE loses when it runs fewer experts: held-out NLL with one
layer at a lower k and the others at the checkpoint's, for every layer, and the whole model at a
uniform k against the same mean k spent unevenly.

Why: `convert dense-to-moe --dense-layers` rests on this. On the default SmolLM2-MoE the first
layer is by far the most sensitive, so keeping it dense costs little compute and much less
quality than a uniform cut.

    .venv/bin/python bench/bench_layer_k.py --model ~/.cache/moeflow/smollm2-135m-moe-e16s2k10-v2 \\
        --tokens 2048 --ks 2 6 --uniform 6 --out bench/out/layer-k.json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from heldout import load_moe, mean_nll


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens (builtin:evaluation)")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 6], help="the lower k each layer is tried at")
    ap.add_argument("--uniform", type=int, default=6, help="the mean k the uneven allocations keep")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/layer-k.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm, ids, layers = load_moe(a.model, a.tokens)
    base_args = layers[0].m
    K, E = base_args.top_k, base_args.n_experts

    def nll(ks: list[int]) -> float:
        for block, k in zip(layers, ks):
            block.m = replace(base_args, top_k=k)  # (each block its own args: k per layer)
        return mean_nll(lm, ids)

    L = len(layers)
    base = nll([K] * L)
    print(f"{L} MoE layers, k = {K} of {E} routed: NLL {base:.4f}", flush=True)
    sens = {}
    for k in a.ks:
        sens[k] = [nll([K] * i + [k] + [K] * (L - i - 1)) - base for i in range(L)]
        print(f"one layer at k = {k}: +NLL per layer " + " ".join(f"{d:.3f}" for d in sens[k]), flush=True)
    U = a.uniform
    least = sorted(range(1, L), key=lambda i: sens[min(a.ks, key=lambda k: abs(k - U))][i])
    allocations = {f"uniform k = {U}": [U] * L}
    # the first layer at every expert, paid for by the least sensitive layers at one fewer
    spare = E - U
    first_all = [U] * L
    first_all[0] = E
    for i in least[:spare]:
        first_all[i] = U - 1
    allocations["first layer all experts"] = first_all
    rows = []
    for name, ks in allocations.items():
        assert sum(ks) == U * L, "every allocation spends the same experts"
        v = nll(ks)
        rows.append(dict(name=name, ks=ks, nll=v, perplexity_ratio=math.exp(v - base)))
        print(f"{name}: NLL {v:.4f} ({math.exp(v - base):.3f}x the k = {K} perplexity) ks {ks}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            dict(model=a.model, tokens=len(ids), top_k=K, base_nll=base, sensitivity=sens, rows=rows),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
