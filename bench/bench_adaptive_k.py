"""Per-token adaptive k on a converted MoE: is a fixed k the right way to spend the experts?

Each token gets the fewest experts whose router probabilities sum to p (the converted router is
trained to follow each token's activation mass over the experts), against a fixed k with the same
mean. Held-out NLL on builtin:evaluation, fp32. Dropped experts get weight 0, so every expert
still runs: this measures quality, not speed.

    .venv/bin/python bench/bench_adaptive_k.py --model ~/.cache/moeflow/smollm2-135m-moe-e16s2k10-v2 \\
        --tokens 2048 --fixed 6 7 8 10 --top-p 0.5 0.6 0.7 --out bench/out/adaptive-k.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from heldout import load_moe, mean_nll


class Route:
    """Routing for every layer: the top `k` experts by router probability, or (top_p set) the
    fewest whose probabilities reach top_p. Counts the experts kept."""

    def __init__(self, n_experts: int, k: int | None = None, top_p: float | None = None):
        self.E, self.k, self.top_p = n_experts, k, top_p
        self.kept = self.steps = 0

    def __call__(self, logits: torch.Tensor, top_k: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        probs, ids = torch.softmax(logits.float(), -1).sort(-1, descending=True)  # [T, E]
        if self.top_p is None:
            keep = (torch.arange(self.E) < self.k).expand_as(probs)
        else:
            keep = (probs.cumsum(-1) - probs) < self.top_p  # up to and including the one reaching p
        self.kept += int(keep.sum())
        self.steps += keep.shape[0]
        return keep.float(), ids  # every expert in order; the dropped ones with weight 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a checkpoint from `moeflow convert dense-to-moe`")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens (builtin:evaluation)")
    ap.add_argument("--fixed", type=int, nargs="+", default=[6, 7, 8, 10])
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/adaptive-k.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm, ids, blocks = load_moe(a.model, a.tokens)
    E = blocks[0].m.n_experts

    def nll(route: Route) -> float:
        for block in blocks:
            block.route = route
        return mean_nll(lm, ids)

    rows = []
    routes = [("fixed k", Route(E, k=k)) for k in a.fixed] + [("top-p", Route(E, top_p=p)) for p in a.top_p]
    for kind, route in routes:
        v = nll(route)
        mean_k = route.kept / route.steps
        rows.append(
            dict(kind=kind, k=route.k, top_p=route.top_p, mean_k=mean_k, nll=v, perplexity=math.exp(v))
        )
        print(
            f"{kind:8s} {route.k or route.top_p!s:>5}: mean k {mean_k:5.2f}  perplexity {math.exp(v):.2f}",
            flush=True,
        )
    fixed = sorted((r["mean_k"], r["perplexity"]) for r in rows if r["kind"] == "fixed k")
    for r in rows:
        if r["kind"] == "top-p" and fixed[0][0] <= r["mean_k"] <= fixed[-1][0]:
            same = r["fixed_k_at_same_mean"] = interpolate(fixed, r["mean_k"])
            print(f"top-p {r['top_p']}: {r['perplexity']:.2f} against {same:.2f} for a fixed k at that mean")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(model=a.model, tokens=len(ids), rows=rows), indent=2))


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Perplexity of a fixed k at a fractional mean k, linear between the measured neighbours."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise ValueError(f"mean k {x} outside the fixed runs")


if __name__ == "__main__":
    main()
