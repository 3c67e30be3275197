"""Synthetic routing traces for tests and for trying policies without a model.

Routing in trained MoE models depends strongly on the token itself, drifts with the context, and
favours some experts per layer. The generator copies those three traits: each vocabulary entry has
a preference over the experts of every layer (a layer's preference partly carried over from the
layer below through a fixed shuffle, so layer-to-layer co-occurrence is learnable), each sequence
adds a context bias, each layer a popularity bias. Tokens are Zipf-distributed, and a share of each
sequence's tokens comes from its own small vocabulary, which makes expert reuse bursty."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .trace import Trace, TraceMeta


@dataclass
class SyntheticSpec:
    n_tokens: int = 4096
    n_layers: int = 8
    n_experts: int = 32
    top_k: int = 4
    seq_len: int = 256
    vocab: int = 2048
    zipf: float = 1.1  # token frequency ~ 1 / rank**zipf
    topic: float = 0.5  # share of a sequence's tokens drawn from its own vocabulary
    topic_vocab: int = 64
    popularity: float = 1.0  # spread of each layer's per-expert bias
    context: float = 0.5  # spread of each sequence's per-expert bias
    noise: float = 0.5  # spread of each token's own per-expert noise
    layer_carry: float = 0.6  # how much of layer l-1's preference carries into layer l
    unused: float = 0.0  # share of slots left unused (-1), as adaptive top-k does
    hidden: int = 2048
    expert_intermediate: int = 1408
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"synthetic trace: top_k {self.top_k} must be within 1..{self.n_experts}")
        if min(self.n_tokens, self.n_layers, self.seq_len, self.vocab, self.topic_vocab) < 1:
            raise ConfigError("synthetic trace: sizes must be positive")


def synthetic_trace(spec: SyntheticSpec) -> Trace:
    rng = np.random.default_rng(spec.seed)
    seq = np.arange(spec.n_tokens, dtype=np.int32) // spec.seq_len
    tokens = _tokens(spec, seq, rng)
    pref = _preferences(spec, rng)  # [V, L, E]
    n_seq = int(seq[-1]) + 1
    popularity = spec.popularity * rng.standard_normal((spec.n_layers, spec.n_experts), dtype=np.float32)
    context = spec.context * rng.standard_normal((n_seq, spec.n_layers, spec.n_experts), dtype=np.float32)
    shape = (spec.n_tokens, spec.n_layers, spec.top_k)
    experts, weights = np.empty(shape, np.int16), np.empty(shape, np.float32)
    for layer in range(spec.n_layers):
        score = pref[tokens, layer] + popularity[layer] + context[seq, layer]  # [T, E]
        score += spec.noise * rng.standard_normal(score.shape, dtype=np.float32)
        top = np.argpartition(-score, spec.top_k - 1, axis=1)[:, : spec.top_k]  # [T, K]
        top_score = np.take_along_axis(score, top, axis=1)
        order = np.argsort(-top_score, axis=1)  # best first, as a router lists them
        top, top_score = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_score, order, axis=1)
        w = np.exp(top_score - top_score[:, :1])
        experts[:, layer], weights[:, layer] = top, w / w.sum(1, keepdims=True)
    _drop_slots(experts, weights, spec.unused, rng)
    return Trace(experts, weights, tokens, seq, _meta(spec))


def _tokens(spec: SyntheticSpec, seq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / np.arange(1, spec.vocab + 1) ** spec.zipf
    p /= p.sum()
    common = rng.choice(spec.vocab, size=spec.n_tokens, p=p)
    own_vocab = rng.choice(spec.vocab, size=(int(seq[-1]) + 1, spec.topic_vocab), p=p)  # [S, V']
    q = p[: spec.topic_vocab] / p[: spec.topic_vocab].sum()
    own = own_vocab[seq, rng.choice(spec.topic_vocab, size=spec.n_tokens, p=q)]
    return np.where(rng.random(spec.n_tokens) < spec.topic, own, common).astype(np.int32)


def _preferences(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    V, L, E = spec.vocab, spec.n_layers, spec.n_experts
    pref = rng.standard_normal((V, L, E), dtype=np.float32)
    keep = np.sqrt(1.0 - spec.layer_carry**2)
    for layer in range(1, L):
        shuffle = rng.permutation(E)  # expert e below feeds expert shuffle[e] here
        carried = np.empty_like(pref[:, layer])
        carried[:, shuffle] = pref[:, layer - 1]
        pref[:, layer] = spec.layer_carry * carried + keep * pref[:, layer]
    return pref


def _drop_slots(experts: np.ndarray, weights: np.ndarray, share: float, rng: np.random.Generator) -> None:
    """Leaves the best expert of every token-layer and marks a random share of the others unused."""
    if share <= 0:
        return
    drop = rng.random(experts.shape) < share
    drop[..., 0] = False
    experts[drop], weights[drop] = -1, 0.0


def _meta(spec: SyntheticSpec) -> TraceMeta:
    return TraceMeta(
        model=f"synthetic-seed{spec.seed}",
        model_type="synthetic",
        moe_layers=list(range(spec.n_layers)),
        n_experts=spec.n_experts,
        top_k=spec.top_k,
        hidden=spec.hidden,
        expert_intermediate=spec.expert_intermediate,
        expert_bytes=3 * spec.hidden * spec.expert_intermediate * 2,
        dtype="bfloat16",
    )
