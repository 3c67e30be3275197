"""Config readers the two DeepSeek families share: latent attention and the MoE geometry."""

from .args import AttentionArgs, RopeArgs


def mla(cfg: dict, interleaved: bool) -> AttentionArgs:
    rope_dim = cfg["qk_rope_head_dim"]
    bias = bool(cfg.get("attention_bias", False))
    return AttentionArgs(
        kind="mla",
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg["qk_nope_head_dim"] + rope_dim,
        rope=RopeArgs.from_hf(cfg, rope_dim, interleaved=interleaved),
        qkv_bias=bias,
        o_bias=bias,
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=rope_dim,
        v_head_dim=cfg["v_head_dim"],
    )


def moe_layers(cfg: dict) -> list[int]:
    return list(range(cfg.get("first_k_dense_replace") or 0, cfg["num_hidden_layers"]))


def shared_intermediate(cfg: dict) -> int:
    return (cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"]


def sanitize(name: str) -> str:
    return name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
