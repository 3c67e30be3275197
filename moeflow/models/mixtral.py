"""Mixtral: softmax over all experts, top-k, renormalise; Mixtral names its experts w1/w3/w2."""

import re
from functools import partial

from ..layers.routing import softmax_topk
from . import hf
from .args import ModelArgs, MoEArgs


def args_from_config(cfg: dict) -> ModelArgs:
    moe = MoEArgs(
        n_experts=hf.n_experts(cfg),
        top_k=cfg["num_experts_per_tok"],
        intermediate=cfg["intermediate_size"],
        renormalize=True,
    )
    return ModelArgs(
        **hf.common(cfg),
        attention=hf.gqa(cfg, qkv_bias=False),
        moe=moe,
        moe_layers=list(range(cfg["num_hidden_layers"])),
    )


def route(args: ModelArgs):
    return partial(softmax_topk, renormalize=True)


_EXPERT = re.compile(r"\.experts\.(\d+)\.w([123])\.")
_NAMES = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


def sanitize(name: str) -> str:
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return _EXPERT.sub(lambda m: f".experts.{m.group(1)}.{_NAMES[m.group(2)]}.", name)
