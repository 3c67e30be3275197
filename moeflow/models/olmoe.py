"""OLMoE: RMSNorm over the whole q and k projections (not per head), optional qkv clipping."""

from functools import partial

from ..layers.routing import softmax_topk
from . import hf
from .args import ModelArgs, MoEArgs


def args_from_config(cfg: dict) -> ModelArgs:
    moe = MoEArgs(
        n_experts=hf.n_experts(cfg),
        top_k=cfg["num_experts_per_tok"],
        intermediate=cfg["intermediate_size"],
        renormalize=bool(cfg.get("norm_topk_prob", False)),
    )
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        **hf.common(cfg),
        attention=hf.gqa(cfg, qkv_bias=bias, o_bias=bias, qk_norm="full"),
        moe=moe,
        moe_layers=list(range(cfg["num_hidden_layers"])),
    )


def route(args: ModelArgs):
    return partial(softmax_topk, renormalize=args.moe.renormalize)


def sanitize(name: str) -> str:
    return name
