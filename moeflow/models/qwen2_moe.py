"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): qkv bias; softmax top-k, renormalised only with
norm_topk_prob; a shared expert scaled by a sigmoid gate."""

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
        shared_intermediate=cfg.get("shared_expert_intermediate_size") or 0,
        shared_gate=bool(cfg.get("shared_expert_intermediate_size")),
    )
    return ModelArgs(
        **hf.common(cfg),
        attention=hf.gqa(cfg, qkv_bias=cfg.get("qkv_bias", True)),
        moe=moe,
        moe_layers=hf.qwen_moe_layers(cfg),
    )


def route(args: ModelArgs):
    return partial(softmax_topk, renormalize=args.moe.renormalize)


def sanitize(name: str) -> str:
    return name
