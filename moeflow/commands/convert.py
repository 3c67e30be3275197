"""`moeflow convert dense-to-moe SRC OUT`: split a dense Llama's FFNs into experts."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from ..convert.dense_to_moe import convert_path
from ..convert.finetune import FinetuneConfig
from ..convert.moefy import ConvertConfig
from ..corpus import read_text


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert models (dense-to-moe)")
    kinds = c.add_subparsers(dest="kind", required=True)
    d = kinds.add_parser("dense-to-moe", help="split a dense Llama's FFNs into routed experts")
    d.add_argument("src", help="dense Llama: a .gguf file or a safetensors checkpoint folder")
    d.add_argument("out", help="new checkpoint folder (must not exist)")
    d.add_argument("--experts", type=int, required=True, help="E: equal slices of each FFN (shared included)")
    d.add_argument("--top-k", type=int, required=True, help="K: routed experts run per token")
    d.add_argument("--shared-experts", type=int, default=0, help="S: slices always on (most active neurons)")
    d.add_argument(
        "--calibration",
        nargs="+",
        default=["builtin:calibration"],
        metavar="FILE",
        help="calibration text files (default: builtin:calibration, Python's stdlib docstrings)",
    )
    d.add_argument(
        "--dense-layers",
        type=int,
        default=0,
        metavar="N",
        help="keep the first N FFNs dense (the first layer loses the most from routing)",
    )
    d.add_argument("--calibration-tokens", type=int, default=32768)
    d.add_argument("--no-router-training", action="store_true", help="keep the centroid router")
    d.add_argument("--distill", action="store_true", help="refit down projections to the dense output")
    d.add_argument(
        "--finetune-tokens",
        type=int,
        default=0,
        metavar="N",
        help="then train experts and routers end to end on N tokens against the dense model's "
        "next-token distribution (KL); ~100 tokens/s on 2 CPU cores for a 135M model",
    )
    d.add_argument(
        "--finetune-lr", type=float, default=FinetuneConfig.lr, help="per step, relative to each tensor's RMS"
    )
    d.add_argument("--finetune-frozen-router", action="store_true", help="fine-tune the experts only")
    d.add_argument(
        "--finetune-attention",
        action="store_true",
        help="fine-tune the attention projections too (they adapt to the experts' errors)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--dtype",
        default="float32",
        help="weights on disk: float32 (default), bfloat16 or float16 (routers and norms stay float32)",
    )
    d.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(a) -> int:
    cfg = ConvertConfig(
        experts=a.experts,
        top_k=a.top_k,
        shared=a.shared_experts,
        dense_layers=a.dense_layers,
        train_router=not a.no_router_training,
        distill=a.distill,
        calibration_tokens=a.calibration_tokens,
        seed=a.seed,
        dtype=a.dtype,
        finetune=FinetuneConfig(
            tokens=a.finetune_tokens,
            lr=a.finetune_lr,
            train_router=not a.finetune_frozen_router,
            train_attention=a.finetune_attention,
            seed=a.seed,
        ),
    )
    text = "\n\n".join(read_text(f) for f in a.calibration)
    s = convert_path(a.src, a.out, cfg, text, progress=sys.stderr.isatty())
    if a.json:
        print(json.dumps(asdict(s), indent=2))
        return 0
    dense = f", the first {s.dense_layers} layer(s) dense" if s.dense_layers else ""
    print(
        f"wrote {s.out}: {s.experts} experts of {s.expert_width} neurons per layer "
        f"({s.shared} shared, top-{s.top_k} routed){dense}, "
        f"{100 * s.active_share:.1f}% of FFN neurons active per token | router picks "
        f"{100 * s.router_mass_recall:.1f}% of the best top-k activation mass "
        f"| calibrated on {s.calibration_tokens} tokens | {s.seconds:.0f} s"
    )
    if s.finetune:
        f = s.finetune
        print(
            f"fine-tuned end to end on {f.tokens} tokens ({f.steps} steps, {f.seconds:.0f} s): held-out "
            f"KL to the dense model {f.kl_before:.4f} -> {f.kl_after:.4f} nats/token"
        )
    return 0
