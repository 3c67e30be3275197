"""How good can a converted MoE get at a given active share, whatever the router? Perplexity of
SmolLM2-135M when each FFN keeps, per token, the share of its neurons (or of its balanced
co-activation clusters, as `moeflow convert` builds experts) that carries the most activation
mass, chosen by an oracle that sees the true activations: no router error, no refitting.

A row at E clusters is the ceiling of a conversion with E experts before distillation; the
per-neuron row is the ceiling of any selection at that share.

    python bench/bench_convert_oracle.py [--share 0.5] [--experts 32 128 384] [--eval-tokens 4096]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--experts", type=int, nargs="+", default=[32, 128, 384])
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
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"dense": base, "share": a.share, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
