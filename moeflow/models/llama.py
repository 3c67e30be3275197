"""Llama (dense): every layer a SwiGLU FFN. The source family for dense-to-MoE conversion.

A dense model has no routed experts; `moe` describes the FFN as one always-on expert so code
that sizes per-expert tables (activation counts, metrics) needs no special case."""

from ..errors import UnsupportedModelError
from ..layers.routing import topk_sum
from . import hf
from .args import ModelArgs, MoEArgs


def args_from_config(cfg: dict) -> ModelArgs:
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("llama with mlp_bias=true is not supported")
    bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        **hf.common(cfg),
        attention=hf.gqa(cfg, qkv_bias=bias, o_bias=bias),
        moe=MoEArgs(n_experts=1, top_k=1, intermediate=cfg["intermediate_size"]),
        moe_layers=[],
    )


def route(args: ModelArgs):
    return topk_sum


def sanitize(name: str) -> str:
    return name
