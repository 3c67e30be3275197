"""Dense FFN -> MoE, one layer at a time, from FFN inputs recorded on calibration text.

For each layer: neuron importance = |silu(gate x) * (up x)| x |down column| per token; the most
important neurons on average become shared experts; the rest are clustered by co-activation into
equal experts; a router is built (centroid heuristic) and optionally fitted to the experts' mass;
optionally the down projections are refitted to the dense output (distillation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .cluster import balanced_kmeans, groups
from .distill import refit_down
from .finetune import FinetuneConfig
from .router import centroid_router, expert_mass, fit_router, mass_recall

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLUSTER_TOKENS = 4096  # tokens whose activation pattern describes a neuron for clustering


@dataclass
class ConvertConfig:
    experts: int  # E: equal slices of each FFN, shared ones included
    top_k: int  # routed experts per token
    shared: int = 0  # S of the E slices always on
    train_router: bool = True
    distill: bool = False
    calibration_tokens: int = 32768
    seed: int = 0
    dtype: str = "float32"  # on disk; routers and norms stay float32 (routing is rounding-sensitive)
    # the first N FFNs stay dense, as DeepSeek keeps its first layers: the first layer is by far
    # the most sensitive to losing neurons (SmolLM2-MoE: 0.59 nats of perplexity at k = 2 of 14,
    # against 0.01-0.05 for most others, and 0.11 for the last; BENCHMARKS.md)
    dense_layers: int = 0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # end to end, after the layers

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    def check(self, ffn_width: int, n_layers: int) -> None:
        if not 0 <= self.dense_layers < n_layers:
            raise ConfigError(
                f"--dense-layers must be in 0..{n_layers - 1} (the model has {n_layers} layers), "
                f"got {self.dense_layers}"
            )
        if self.experts < 1 or ffn_width % self.experts:
            raise ConfigError(f"--experts {self.experts} does not divide the FFN width {ffn_width}")
        if not 0 <= self.shared < self.experts:
            raise ConfigError(f"--shared-experts must be in 0..{self.experts - 1}, got {self.shared}")
        if not 0 < self.top_k <= self.routed:
            raise ConfigError(
                f"--top-k must be in 1..{self.routed} (experts minus shared experts), got {self.top_k}"
            )
        if self.dtype not in SAVE_DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.dtype!r}")
        if self.calibration_tokens < 256:
            raise ConfigError(f"--calibration-tokens must be at least 256, got {self.calibration_tokens}")
        self.finetune.check()

    def active_share(self, n_layers: int) -> float:
        """FFN neurons computed per token, over all layers (dense ones compute all of theirs)."""
        moe = (self.shared + self.top_k) / self.experts
        return (self.dense_layers + (n_layers - self.dense_layers) * moe) / n_layers


@dataclass
class LayerMoE:
    shared: torch.Tensor  # [S*m] neuron indices of the shared expert (may be empty)
    experts: list[torch.Tensor]  # E' x [m] neuron indices
    router: torch.Tensor  # [E', H]
    gate: torch.Tensor  # [F, H] (original, or trained end to end)
    up: torch.Tensor  # [F, H]
    down: torch.Tensor  # [H, F] (refitted, trained, or original)
    stats: dict = field(default_factory=dict)


def intermediate(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ gate.T) * (x @ up.T)  # [N, F]


def convert_layer(x: torch.Tensor, gate, up, down, cfg: ConvertConfig) -> LayerMoE:
    width = gate.shape[0]
    m = width // cfg.experts
    acts = intermediate(x, gate, up)
    importance = acts.abs() * down.norm(dim=0)  # [N, F]
    order = importance.mean(0).argsort(descending=True)
    shared, rest = order[: cfg.shared * m].sort().values, order[cfg.shared * m :].sort().values
    gen = torch.Generator().manual_seed(cfg.seed)
    sample = torch.randperm(x.shape[0], generator=gen)[:CLUSTER_TOKENS]
    labels = balanced_kmeans(importance[sample][:, rest].T, cfg.routed, seed=cfg.seed)
    experts = [rest[g] for g in groups(labels, cfg.routed)]
    mass = expert_mass(importance, experts)  # [N, E']
    router = centroid_router(gate, experts)
    stats = {"recall_centroid": mass_recall(x @ router.T, mass, cfg.top_k)}
    if cfg.train_router:
        router = fit_router(x, mass, router, seed=cfg.seed)
        stats["recall_trained"] = mass_recall(x @ router.T, mass, cfg.top_k)
    stats["mass_in_topk"] = float(mass.topk(cfg.top_k, dim=1).values.sum() / mass.sum())
    keep = _computed(x, router, experts, shared, width, cfg.top_k)
    dense_out = acts @ down.T
    if cfg.distill and cfg.top_k < cfg.routed:
        down = refit_down(acts, keep, dense_out, down)
    stats["output_error"] = float((dense_out - (acts * keep) @ down.T).norm() / dense_out.norm())
    return LayerMoE(shared, experts, router, gate.clone(), up.clone(), down.clone(), stats)


def _computed(x, router, experts, shared, width: int, k: int) -> torch.Tensor:
    """[N, F] bool: which neurons the converted layer computes for each token."""
    chosen = (x @ router.T).topk(k, dim=1).indices  # [N, k]
    owner = torch.empty(width, dtype=torch.long)
    for e, g in enumerate(experts):
        owner[g] = e
    hit = torch.zeros(x.shape[0], len(experts), dtype=torch.bool).scatter_(1, chosen, True)
    keep = torch.ones(x.shape[0], width, dtype=torch.bool)
    routed = torch.ones(width, dtype=torch.bool)
    routed[shared] = False
    keep[:, routed] = hit[:, owner[routed]]
    return keep


def layer_tensors(i: int, layer: LayerMoE) -> dict[str, torch.Tensor]:
    """HF-style names of one converted layer, as moeflow_llama_moe reads them."""
    p = f"model.layers.{i}.mlp."
    out = {p + "gate.weight": layer.router.contiguous()}
    parts = [("shared_expert.", layer.shared)] if len(layer.shared) else []
    parts += [(f"experts.{e}.", g) for e, g in enumerate(layer.experts)]
    for prefix, idx in parts:
        out[p + prefix + "gate_proj.weight"] = layer.gate[idx].contiguous()
        out[p + prefix + "up_proj.weight"] = layer.up[idx].contiguous()
        out[p + prefix + "down_proj.weight"] = layer.down[:, idx].contiguous()
    return out
