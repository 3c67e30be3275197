"""Tiny random configs for every family, built with transformers itself (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

BASE = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    tie_word_embeddings=False,
)
_DEEPSEEK = dict(
    num_key_value_heads=4,
    moe_intermediate_size=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
)

# name -> (model_type, overrides). Variants cover every routing and attention option we read.
CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-swa": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
        ),
    ),
    "qwen2_moe-sparse-step": (
        "qwen2_moe",
        dict(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=True,
            num_hidden_layers=3,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=24, norm_topk_prob=True
        ),
    ),
    "olmoe": ("olmoe", dict(num_experts=6, num_experts_per_tok=2, clip_qkv=2.0, eos_token_id=1)),
    "deepseek_v2": ("deepseek_v2", dict(_DEEPSEEK, q_lora_rank=None, first_k_dense_replace=0)),
    "deepseek_v2-group": (
        "deepseek_v2",
        dict(
            _DEEPSEEK,
            q_lora_rank=24,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.0,
        ),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            _DEEPSEEK,
            q_lora_rank=24,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            num_hidden_layers=3,
        ),
    ),
    "deepseek_v3-yarn": (
        "deepseek_v3",
        dict(
            _DEEPSEEK,
            q_lora_rank=None,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            rope_interleave=False,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
                mscale=1.0,
                mscale_all_dim=1.0,
                beta_fast=32,
                beta_slow=1,
            ),
        ),
    ),
}


def build_reference(name: str, seed: int = 0):
    """Returns a random transformers model for CONFIGS[name] in fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = CONFIGS[name]
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for mod in model.modules():  # DeepSeek-V3's correction bias starts at zero: make it matter
            bias = getattr(mod, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn_like(bias) * 0.5)
    return model


def save(model, folder: Path, fused: bool) -> Path:
    """Per-expert layout via save_pretrained, or the in-memory fused 3-D tensors written as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    if not fused:
        model.save_pretrained(folder)
        return folder
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert any(k.endswith("experts.gate_up_proj") for k in state), "expected fused experts in memory"
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), default=str))
    return folder
