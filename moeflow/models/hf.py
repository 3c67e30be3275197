"""Readers for config.json fields several families share."""

from ..errors import UnsupportedModelError
from .args import AttentionArgs, RopeArgs, eos_list


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def gqa(cfg: dict, qkv_bias: bool, o_bias: bool = False, qk_norm: str = "none") -> AttentionArgs:
    d = head_dim(cfg)
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("use_sliding_window=true is not supported for this family")
    return AttentionArgs(
        kind="gqa",
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=d,
        rope=RopeArgs.from_hf(cfg, d),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        clip_qkv=cfg.get("clip_qkv"),
        sliding_window=cfg.get("sliding_window") or None,
    )


def n_experts(cfg: dict) -> int:
    """Older and newer config.json files name the routed expert count differently."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            return cfg[key]
    raise KeyError("num_experts")


def qwen_moe_layers(cfg: dict) -> list[int]:
    """Qwen-MoE: every decoder_sparse_step-th layer is sparse unless listed in mlp_only_layers."""
    skip = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step") or 1
    n = cfg["num_hidden_layers"]
    if not n_experts(cfg):
        return []
    return [i for i in range(n) if i not in skip and (i + 1) % step == 0]


def common(cfg: dict) -> dict:
    """ModelArgs fields every family reads the same way."""
    return dict(
        model_type=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        intermediate=cfg.get("intermediate_size") or 0,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=cfg.get("max_position_embeddings") or 4096,
        hidden_act=cfg.get("hidden_act", "silu"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_list(cfg),
    )
