"""Qwen3-MoE: RMSNorm on q and k per head; softmax top-k with norm_topk_prob; no shared expert."""

from functools import partial

from ..layers.routing import softmax_topk
from . import hf
from .args import ModelArgs, MoEArgs


def args_from_config(cfg: dict) -> ModelArgs:
    moe = MoEArgs(
        n_experts=hf.n_experts(cfg),
        top_k=cfg["num_experts_per_tok"],
        intermediate=cfg["moe_intermediate_size"],
        renormalize=bool(cfg.get("norm_topk_prob", False)),
    )
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        **hf.common(cfg),
        attention=hf.gqa(cfg, qkv_bias=bias, o_bias=bias, qk_norm="head"),
        moe=moe,
        moe_layers=hf.qwen_moe_layers(cfg),
    )


def route(args: ModelArgs):
    return partial(softmax_topk, renormalize=args.moe.renormalize)


def sanitize(name: str) -> str:
    return name
