"""Typed model configuration shared by every family; each family file fills it from HF config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError, UnsupportedModelError


def _positive(name: str, value: int | float) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


@dataclass
class RopeArgs:
    theta: float
    dim: int  # rotated dims per head
    interleaved: bool = False  # DeepSeek rotates pairs (x0, x1), others halves (x_i, x_{i+d/2})
    kind: Literal["default", "yarn", "linear"] = "default"
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        _positive("rope_theta", self.theta)
        _positive("rope dim", self.dim)
        if self.kind not in ("default", "yarn", "linear"):
            raise UnsupportedModelError(f"rope_type {self.kind!r} is not supported (default, yarn, linear)")

    @classmethod
    def from_hf(cls, cfg: dict, dim: int, interleaved: bool = False) -> RopeArgs:
        rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = rp.get("rope_type", rp.get("type", "default"))
        return cls(
            theta=float(theta),
            dim=dim,
            interleaved=interleaved,
            kind=kind,
            factor=float(rp.get("factor") or 1.0),
            original_max_position=int(rp.get("original_max_position_embeddings") or 0),
            beta_fast=float(rp.get("beta_fast") or 32),
            beta_slow=float(rp.get("beta_slow") or 1),
            mscale=float(rp.get("mscale") or 0),
            mscale_all_dim=float(rp.get("mscale_all_dim") or 0),
            attention_factor=rp.get("attention_factor"),
            truncate=bool(rp.get("truncate", True)),
        )


@dataclass
class AttentionArgs:
    kind: Literal["gqa", "mla"]
    n_heads: int
    n_kv_heads: int
    head_dim: int  # q/k head dim for gqa; q/k (nope + rope) dim for mla
    rope: RopeArgs
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"  # qwen3: per head; olmoe: over the whole projection
    clip_qkv: float | None = None
    sliding_window: int | None = None
    # multi-head latent attention (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        _positive("num_attention_heads", self.n_heads)
        _positive("num_key_value_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.kind == "mla":
            _positive("kv_lora_rank", self.kv_lora_rank)
            _positive("qk_rope_head_dim", self.qk_rope_head_dim)
            _positive("v_head_dim", self.v_head_dim)

    @property
    def softmax_scale(self) -> float:
        scale = self.head_dim**-0.5
        r = self.rope
        if r.kind == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class MoEArgs:
    n_experts: int
    top_k: int
    intermediate: int  # per routed expert
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = False
    routed_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_by: Literal["none", "max", "top2_sum"] = "none"
    score_bias: bool = False  # DeepSeek-V3 e_score_correction_bias
    shared_intermediate: int = 0  # 0 = no shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert

    def __post_init__(self):
        _positive("num_experts", self.n_experts)
        _positive("moe_intermediate_size", self.intermediate)
        if not 0 < self.top_k <= self.n_experts:
            raise ConfigError(f"num_experts_per_tok must be in 1..{self.n_experts}, got {self.top_k}")
        if self.n_experts % self.n_group:
            raise ConfigError(
                f"n_group ({self.n_group}) must divide the number of experts ({self.n_experts})"
            )
        if not 0 < self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group must be in 1..n_group ({self.n_group}), got {self.topk_group}")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden: int
    n_layers: int
    intermediate: int  # dense FFN width (dense layers)
    attention: AttentionArgs
    moe: MoEArgs
    moe_layers: list[int] = field(default_factory=list)  # indices of MoE layers; the rest are dense
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_position: int = 4096
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("vocab_size", "hidden", "n_layers", "max_position"):
            _positive(name, getattr(self, name))
        if self.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported (silu)")
        bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"MoE layer indices {bad} are outside 0..{self.n_layers - 1}")

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers


def eos_list(cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
