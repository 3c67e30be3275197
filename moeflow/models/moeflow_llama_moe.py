"""A Llama whose FFNs were split into experts by `moeflow convert dense-to-moe`.

Each layer's FFN neurons are partitioned into equal experts; a linear router picks the top-k
and the chosen experts' outputs are summed with weight 1, so with k = E the layer is exactly
the dense FFN. Optional shared experts are the always-on neurons, stored as one SwiGLU block.
The first `first_k_dense_replace` layers may keep their dense FFN."""

from ..layers.routing import topk_sum
from . import hf
from .args import ModelArgs, MoEArgs


def args_from_config(cfg: dict) -> ModelArgs:
    moe = MoEArgs(
        n_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        intermediate=cfg["moe_intermediate_size"],
        shared_intermediate=cfg.get("shared_expert_intermediate_size") or 0,
    )
    return ModelArgs(
        **hf.common(cfg),
        attention=hf.gqa(cfg, qkv_bias=bool(cfg.get("attention_bias", False))),
        moe=moe,
        moe_layers=list(range(cfg.get("first_k_dense_replace") or 0, cfg["num_hidden_layers"])),
    )


def route(args: ModelArgs):
    return topk_sum


def sanitize(name: str) -> str:
    return name
