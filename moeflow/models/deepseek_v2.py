"""DeepSeek-V2 (and V2-Lite): latent attention with rope on interleaved pairs; softmax scores,
greedy or group-limited top-k (group = its best expert), scaled, not renormalised."""

from functools import partial

from ..errors import UnsupportedModelError
from ..layers.routing import softmax_group_topk
from . import deepseek, hf
from .args import ModelArgs, MoEArgs


def args_from_config(cfg: dict) -> ModelArgs:
    method = cfg.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    moe = MoEArgs(
        n_experts=hf.n_experts(cfg),
        top_k=cfg["num_experts_per_tok"],
        intermediate=cfg["moe_intermediate_size"],
        routed_scale=float(cfg.get("routed_scaling_factor") or 1.0),
        n_group=(cfg.get("n_group") or 1) if grouped else 1,
        topk_group=(cfg.get("topk_group") or 1) if grouped else 1,
        group_by="max" if grouped else "none",
        shared_intermediate=deepseek.shared_intermediate(cfg),
    )
    return ModelArgs(
        **hf.common(cfg),
        attention=deepseek.mla(cfg, interleaved=True),
        moe=moe,
        moe_layers=deepseek.moe_layers(cfg),
    )


def route(args: ModelArgs):
    m = args.moe
    return partial(softmax_group_topk, n_group=m.n_group, topk_group=m.topk_group, scale=m.routed_scale)


sanitize = deepseek.sanitize
