"""How good can a converted MoE get at a given active share, whatever the router? Perplexity of
SmolLM2-135M when each FFN keeps, per token, the share of its neurons (or of its balanced
co-activation clusters, as `moeflow convert` builds experts) that carries the most activation
mass, chosen by an oracle that sees the true activations: no router error, no refitting.

A row at E clusters is the ceiling of a conversion with E experts before distillation; the
per-neuron row is the ceiling of any selection at that share.

Rows without the oracle ask what a per-neuron selection gets from a predictor cheaper than the FFN:
--gate-only ranks neurons by |silu(gate x)| times a calibrated per-neuron scale (the gate
projection alone, a third of the FFN's weights); --predictor-ranks R fits a linear predictor of
rank R (x A B + b, least squares on each neuron's standardised log activation mass over the
calibration tokens) and keeps the neurons it ranks highest.

    python bench/bench_convert_oracle.py [--share 0.5] [--experts 32 128 384] [--eval-tokens 4096]
    python bench/bench_convert_oracle.py --experts --gate-only --predictor-ranks 64 128 576
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from moeflow.convert.calibrate import ffn_inputs
from moeflow.convert.cluster import balanced_kmeans
from moeflow.convert.gguf import read_gguf
from moeflow.convert.moefy import intermediate
from moeflow.corpus import calibration_text, evaluation_text
from moeflow.default_model import smollm2_gguf
from moeflow.eval.perplexity import perplexity
from moeflow.loader.checkpoint import MemoryCheckpoint
from moeflow.loader.load import load


def per_neuron(share: float, gate, up, down, dnorm):
    def forward(x):
        a = F.silu(F.linear(x, gate)) * F.linear(x, up)
        mass = a.abs() * dnorm
        cut = mass.topk(int(share * a.shape[-1]), dim=-1).values[..., -1:]
        return F.linear(a * (mass >= cut), down)

    return forward


def per_cluster(share: float, owner: torch.Tensor, n: int, gate, up, down, dnorm):
    """owner [F]: each neuron's cluster."""

    def forward(x):
        a = F.silu(F.linear(x, gate)) * F.linear(x, up)
        mass = torch.zeros(*a.shape[:-1], n).index_add_(-1, owner, a.abs() * dnorm)
        top = mass.topk(int(share * n), dim=-1).indices
        keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)
        return F.linear(a * keep[..., owner], down)

    return forward


def selected(share: float, score, gate, up, down):
    """Keeps, per token, the share of neurons that score(x) ranks highest; exact activations."""

    def forward(x):
        sc = score(x)
        top = sc.topk(int(share * sc.shape[-1]), dim=-1).indices
        keep = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, top, True)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up) * keep, down)

    return forward


def fit_predictor(x: torch.Tensor, mass: torch.Tensor, rank: int, steps: int = 300, seed: int = 0):
    """A rank-`rank` linear map from the FFN input to each neuron's standardised log mass."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.log(mass + 1e-6)
    target = (target - target.mean(1, keepdim=True)) / target.std(1, keepdim=True)
    a = (torch.randn(x.shape[1], rank, generator=gen) / x.shape[1] ** 0.5).requires_grad_(True)
    b = torch.zeros(rank, mass.shape[1], requires_grad=True)
    bias = torch.zeros(mass.shape[1], requires_grad=True)
    opt = torch.optim.Adam([a, b, bias], lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (2048,), generator=gen)
            loss = F.mse_loss(x[idx] @ a @ b + bias, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return a.detach(), b.detach(), bias.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--experts", type=int, nargs="*", default=[32, 128, 384])
    ap.add_argument("--gate-only", action="store_true")
    ap.add_argument("--predictor-ranks", type=int, nargs="*", default=[])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calibration-tokens", type=int, default=4096, help="tokens the clustering sees")
    ap.add_argument("--out", default="bench/out/convert-oracle.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    dense = read_gguf(smollm2_gguf(), progress=False)
    tok = dense.tokenizer
    ev = tok.encode(evaluation_text(), add_special_tokens=False)
    lm = load(MemoryCheckpoint(dense.config, dense.tensors), progress=False)
    base = perplexity(lm, ev, max_tokens=a.eval_tokens, progress=False).perplexity
    print(f"dense perplexity {base:.3f} on {a.eval_tokens} held-out tokens", flush=True)
    cal = ffn_inputs(
        dense, tok.encode(calibration_text(), add_special_tokens=False), a.calibration_tokens, False
    )
    mlps = [layer.mlp for layer in lm.model.model.layers]
    weights = [(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight) for m in mlps]
    rows = []
    for n in [0, *a.experts]:  # 0: per neuron
        for i, (m, (g, u, d)) in enumerate(zip(mlps, weights)):
            dnorm = d.float().norm(dim=0)
            if n == 0:
                m.forward = per_neuron(a.share, g, u, d, dnorm)
            else:
                mass = intermediate(cal[i], g.float(), u.float()).abs() * dnorm  # as convert clusters
                m.forward = per_cluster(a.share, balanced_kmeans(mass.T, n), n, g, u, d, dnorm)
        p = perplexity(lm, ev, max_tokens=a.eval_tokens, progress=False).perplexity
        rows.append(
            {"selection": "per neuron" if n == 0 else f"{n} clusters", "perplexity": p, "ratio": p / base}
        )
        print(f"| {rows[-1]['selection']} | {p:.2f} | {p / base:.2f}× |", flush=True)
    predictors = (["gate only"] if a.gate_only else []) + [f"rank {r}" for r in a.predictor_ranks]
    if predictors:
        cal = [c.detach().float() for c in cal]
        weights = [tuple(w.detach().float() for w in ws) for ws in weights]
    for name in predictors:
        for i, (m, (g, u, d)) in enumerate(zip(mlps, weights)):
            dnorm = d.norm(dim=0)
            if name == "gate only":
                c = (cal[i] @ u.T).abs().mean(0) * dnorm  # a neuron's typical |up x| x |down column|
                score = lambda z, g=g, c=c: F.silu(F.linear(z, g)).abs() * c  # noqa: E731
            else:
                mass = intermediate(cal[i], g, u).abs() * dnorm
                pa, pb, pbias = fit_predictor(cal[i], mass, int(name.split()[1]))
                score = lambda z, pa=pa, pb=pb, pbias=pbias: z.float() @ pa @ pb + pbias  # noqa: E731
            m.forward = selected(a.share, score, g, u, d)
        p = perplexity(lm, ev, max_tokens=a.eval_tokens, progress=False).perplexity
        rows.append({"selection": f"per neuron, {name}", "perplexity": p, "ratio": p / base})
        print(f"| {rows[-1]['selection']} | {p:.2f} | {p / base:.2f}× |", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"dense": base, "share": a.share, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
