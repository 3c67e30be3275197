"""Dense -> MoE conversion quality: perplexity of SmolLM2-135M (dense) against its conversions.

For E in --experts and active shares in --shares (shared + routed experts over E), converts with
(1) the centroid router (no training), (2) a trained router, (3) a trained router plus
layer-wise distillation, optionally (4) that plus end-to-end distillation through the whole model
(`--variants "+ end-to-end" --finetune-tokens N`), and measures perplexity on held-out text
(builtin:evaluation, never calibrated on).
One calibration pass is shared by every conversion. Results: JSON plus a Markdown table.

    python bench/bench_convert.py [--calibration-tokens 16384] [--eval-tokens 16384]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from moeflow.convert.calibrate import ffn_inputs
from moeflow.convert.dense_to_moe import convert
from moeflow.convert.finetune import FinetuneConfig
from moeflow.convert.gguf import read_gguf
from moeflow.convert.moefy import ConvertConfig
from moeflow.corpus import calibration_text, evaluation_text
from moeflow.default_model import smollm2_gguf
from moeflow.eval.perplexity import perplexity
from moeflow.loader.checkpoint import MemoryCheckpoint
from moeflow.loader.load import load

VARIANTS = {  # (train router, layer-wise distillation, end-to-end distillation: 0 no, 1 FFNs, 2 + attention)
    "centroid router": (False, False, 0),
    "trained router": (True, False, 0),
    "trained + distill": (True, True, 0),
    "+ end-to-end": (True, True, 1),
    "+ end-to-end + attention": (True, True, 2),
}
DEFAULT_VARIANTS = ["centroid router", "trained router", "trained + distill"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--shared-fraction", type=float, default=0.125, help="shared experts as a share of E")
    ap.add_argument(
        "--dense-layers",
        type=int,
        nargs="+",
        default=[0],
        help="first FFNs kept dense; K is then lowered so the whole model stays within the share",
    )
    ap.add_argument("--workdir", default="bench/.cache/convert")
    ap.add_argument("--keep", action="store_true", help="keep each converted checkpoint in --workdir")
    ap.add_argument("--out", default="bench/out/convert.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    ap.add_argument("--finetune-tokens", type=int, default=65536, help="end-to-end variant's training tokens")
    ap.add_argument(
        "--finetune-lr", type=float, nargs="+", default=[FinetuneConfig.lr], help="a run per rate"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dense = read_gguf(smollm2_gguf(), progress=False)
    tok = dense.tokenizer
    eval_ids = tok.encode(evaluation_text(), add_special_tokens=False)
    ppl = lambda lm: perplexity(lm, eval_ids, max_tokens=a.eval_tokens, progress=False)  # noqa: E731
    base = ppl(load(MemoryCheckpoint(dense.config, dense.tensors), progress=False))
    print(f"dense perplexity {base.perplexity:.3f} over {base.tokens} tokens", flush=True)
    t0 = time.perf_counter()
    calib_ids = tok.encode(calibration_text(), add_special_tokens=False)
    inputs = ffn_inputs(dense, calib_ids, a.calibration_tokens)
    print(f"calibration: {inputs[0].shape[0]} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for E in a.experts:
        S = max(1, round(E * a.shared_fraction))
        for share, N in itertools.product(a.shares, a.dense_layers):
            L = dense.n_layers  # the N dense layers compute all their neurons: the others take fewer
            K = math.floor((share * L - N) / (L - N) * E + 1e-9) - S
            runs = [(n, lr) for n in a.variants for lr in (a.finetune_lr if VARIANTS[n][2] else [0.0])]
            for name, lr in runs:
                train, distill, e2e = VARIANTS[name]
                tune = (
                    FinetuneConfig(tokens=a.finetune_tokens, lr=lr, train_attention=e2e == 2, eval_every=8)
                    if e2e
                    else FinetuneConfig()
                )
                cfg = ConvertConfig(
                    E, K, S, train, distill, a.calibration_tokens, finetune=tune, dense_layers=N
                )
                out = Path(a.workdir) / f"e{E}-k{K}-s{S}-d{N}-{int(train)}{int(distill)}{e2e}"
                label = f"{name} (lr {lr:g})" if len(a.finetune_lr) > 1 and e2e else name
                shutil.rmtree(out, ignore_errors=True)
                s = convert(dense, out, cfg, calib_ids, progress=bool(e2e), inputs=inputs)
                r = ppl(load(out, progress=False))
                row = dict(
                    experts=E,
                    shared=S,
                    top_k=K,
                    dense_layers=N,
                    active_share=cfg.active_share(L),
                    variant=label,
                    perplexity=r.perplexity,
                    ratio=r.perplexity / base.perplexity,
                    router_mass_recall=s.router_mass_recall,
                    convert_s=s.seconds,
                )
                if s.finetune:
                    row.update(finetune=asdict(s.finetune), finetune_lr=lr)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)
    result = dict(
        dense_perplexity=base.perplexity,
        eval_tokens=base.tokens,
        calibration_tokens=inputs[0].shape[0],
        rows=rows,
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(table(result))
    if any(r.get("finetune", {}).get("curve") for r in rows):
        plot_curves(result, Path(a.out).with_suffix(".png"))


def plot_curves(res: dict, path: Path) -> None:
    """Held-out KL to the dense model against end-to-end training tokens, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in res["rows"]:
        if r.get("finetune", {}).get("curve"):
            t, kl = zip(*r["finetune"]["curve"])
            dense = f", {r['dense_layers']} dense" if r.get("dense_layers") else ""
            name = f"E={r['experts']}{dense} {100 * r['active_share']:.1f}% active, lr {r['finetune_lr']:g}"
            ax.plot(
                [x / 1000 for x in t], kl, marker="o", markersize=3, label=f"{name}: {r['ratio']:.2f}× ppl"
            )
    ax.set(xlabel="training tokens (thousands)", ylabel="held-out KL(dense || MoE), nats/token")
    ax.set_title("End-to-end distillation of converted SmolLM2-135M")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"learning curves: {path}")


def table(res: dict) -> str:
    lines = [
        f"dense perplexity {res['dense_perplexity']:.3f}",
    ]
    names = list(dict.fromkeys(r["variant"] for r in res["rows"]))
    lines += [
        "| E | shared | top-k | dense layers | active | " + " | ".join(names) + " |",
        "|---" * (5 + len(names)) + "|",
    ]
    keyed = {}
    for r in res["rows"]:
        key = (r["experts"], r["shared"], r["top_k"], r.get("dense_layers", 0), r["active_share"])
        keyed.setdefault(key, {})[r["variant"]] = r
    for (E, S, K, N, share), v in keyed.items():
        cells = [f"{v[n]['perplexity']:.2f} ({v[n]['ratio']:.2f}×)" if n in v else "–" for n in names]
        lines.append(f"| {E} | {S} | {K} | {N} | {100 * share:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
