"""DeepSeek-V3 / R1 / Kimi-K2 geometry: latent attention; sigmoid scores with a correction bias
that steers the choice, group-limited top-k (group = sum of its two best), renormalised, scaled."""

from functools import partial

from ..layers.routing import sigmoid_group_topk
from . import deepseek, hf
from .args import ModelArgs, MoEArgs


def args_from_config(cfg: dict) -> ModelArgs:
    moe = MoEArgs(
        n_experts=hf.n_experts(cfg),
        top_k=cfg["num_experts_per_tok"],
        intermediate=cfg["moe_intermediate_size"],
        scoring="sigmoid",
        renormalize=bool(cfg.get("norm_topk_prob", True)),
        routed_scale=float(cfg.get("routed_scaling_factor") or 1.0),
        n_group=cfg.get("n_group") or 1,
        topk_group=cfg.get("topk_group") or 1,
        group_by="top2_sum",
        score_bias=True,
        shared_intermediate=deepseek.shared_intermediate(cfg),
    )
    return ModelArgs(
        **hf.common(cfg),
        attention=deepseek.mla(cfg, interleaved=bool(cfg.get("rope_interleave", True))),
        moe=moe,
        moe_layers=deepseek.moe_layers(cfg),
    )


def route(args: ModelArgs):
    m = args.moe
    return partial(
        sigmoid_group_topk,
        n_group=m.n_group,
        topk_group=m.topk_group,
        renormalize=m.renormalize,
        scale=m.routed_scale,
    )


sanitize = deepseek.sanitize
