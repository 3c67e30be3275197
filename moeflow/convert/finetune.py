"""End-to-end distillation of a converted model: after the layer-by-layer conversion, train every
layer's experts (and routers) through the whole network so that the MoE's next-token
distribution matches the dense model's (KL divergence), on calibration text.

Why: layer-wise fitting cannot reach dense quality on SwiGLU models (bench_convert_oracle: even a
perfect router over 128 clustered experts loses 1.63x); each layer's error is fitted in isolation
and compounds over 30 layers, and only training through the network lets a layer correct for the
ones before it. Norms and embeddings stay frozen; attention too unless `train_attention`, which
lets it adapt to the experts' errors as well (its trained projections replace the dense ones in
the written checkpoint)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import ConfigError
from .dense import DenseModel
from .train_forward import LlamaForward

VALIDATION_WINDOWS = 4  # held-out windows (the last of the text) for the before/after KL


@dataclass
class FinetuneConfig:
    tokens: int = 0  # training tokens; 0 = no end-to-end step
    lr: float = 2e-3  # per step, relative to each tensor's RMS (Adam steps are ~lr per element)
    window: int = 256
    batch: int = 8
    train_router: bool = True
    train_attention: bool = False  # also train the attention projections (q, k, v, o)
    seed: int = 0
    eval_every: int = 0  # steps between held-out KL measurements (the learning curve); 0 = ends only

    def check(self) -> None:
        if self.tokens < 0:
            raise ConfigError(f"--finetune-tokens must be ≥ 0, got {self.tokens}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"--finetune-lr must be in (0, 1), got {self.lr}")
        if self.window < 8 or self.batch < 1:
            raise ConfigError(
                f"fine-tune window ≥ 8 and batch ≥ 1 needed, got {self.window} and {self.batch}"
            )


@dataclass
class FinetuneStats:
    tokens: int  # trained on (steps x batch x window)
    steps: int
    kl_before: float  # mean per-token KL(dense || MoE) on held-out windows, nats
    kl_after: float
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens trained, held-out KL)


class StudentFFN(nn.Module):
    """One converted layer as full-width matrices with neurons in expert order [shared | e0 | e1
    ...], so the neurons a token computes are a mask. Computing masked neurons wastes work, but
    a training step is dominated by the backward pass anyway and this keeps it one matmul each."""

    def __init__(self, layer, top_k: int, train_router: bool):
        super().__init__()
        self.order = torch.cat([layer.shared, *layer.experts])
        self.n_shared, self.m, self.k = len(layer.shared), len(layer.experts[0]), top_k
        self.gate = nn.Parameter(layer.gate[self.order].clone())
        self.up = nn.Parameter(layer.up[self.order].clone())
        self.down = nn.Parameter(layer.down[:, self.order].clone())
        self.router = nn.Parameter(layer.router.clone(), requires_grad=train_router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ self.router.T
        hit = torch.zeros_like(scores).scatter_(1, scores.topk(self.k, dim=1).indices, 1.0)
        if self.router.requires_grad:
            # straight through: the forward value stays exactly 1 (experts are summed, as at
            # inference); the gradient reaches the router through the chosen experts' log-probs
            logp = scores.log_softmax(dim=1)
            hit = hit * (1 + logp - logp.detach())
        mask = torch.cat([hit.new_ones(x.shape[0], self.n_shared), hit.repeat_interleave(self.m, dim=1)], 1)
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up) * mask, self.down)

    @torch.no_grad()
    def write_back(self, layer) -> None:
        layer.gate[self.order] = self.gate
        layer.up[self.order] = self.up
        layer.down[:, self.order] = self.down
        layer.router.copy_(self.router)


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over the first tenth, then cosine decay to zero."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def needed_tokens(cfg: FinetuneConfig) -> int:
    return (VALIDATION_WINDOWS + cfg.batch) * cfg.window


def check_tokens(cfg: FinetuneConfig, n: int) -> None:
    if n < needed_tokens(cfg):
        raise ConfigError(f"fine-tuning needs ≥ {needed_tokens(cfg)} calibration tokens, got {n}")


def _windows(ids: list[int], window: int) -> torch.Tensor:
    n = len(ids) // window
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


def _kl(fwd: LlamaForward, ffns, batch: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """fwd: the student's forward (its attention, trained or not), ffns: its FFN of each layer."""
    logp = torch.log_softmax(fwd.logits(batch, lambda i, x: ffns[i](x)), dim=-1)
    return F.kl_div(logp.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def _teacher(fwd: LlamaForward, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(fwd.logits(batch, fwd.dense_ffn), dim=-1)


def finetune(
    dense: DenseModel,
    layers: list,
    ids: list[int],
    top_k: int,
    cfg: FinetuneConfig,
    progress: bool = True,
    first: int = 0,
) -> tuple[FinetuneStats, dict[str, torch.Tensor]]:
    """Trains `layers` (LayerMoE of the model's layers first, first + 1, ..., updated in place;
    the FFNs before `first` stay dense and frozen) through the network on `ids`. Returns the
    stats and the non-FFN tensors it trained (the attention projections, or none), by name."""
    t0 = time.perf_counter()
    check_tokens(cfg, len(ids))
    windows = _windows(ids, cfg.window)
    train, val = windows[:-VALIDATION_WINDOWS], windows[-VALIDATION_WINDOWS:]
    fwd = LlamaForward(dense)  # the teacher: the dense model as it is
    student = LlamaForward(dense, cfg.train_attention)
    students = [StudentFFN(layer, top_k, cfg.train_router) for layer in layers]
    params = [p for s in students for p in s.parameters() if p.requires_grad]
    ffns = [partial(student.dense_ffn, i) for i in range(first)] + students  # one per layer, by index
    params += list(student.trainable.values())
    groups = [{"params": [p], "lr": cfg.lr * p.detach().pow(2).mean().sqrt().item()} for p in params]
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    steps = max(1, math.ceil(cfg.tokens / (cfg.batch * cfg.window)))
    val_teacher = _teacher(fwd, val)
    with torch.no_grad():
        before = _kl(student, ffns, val, val_teacher).item()
    curve = [(0, before)]
    gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(len(train), generator=gen), 0
    bar = tqdm(range(steps), desc="fine-tuning", unit="step", disable=not progress)
    with torch.enable_grad():
        for step in bar:
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * _schedule(step, steps)
            if cursor + cfg.batch > len(train):  # a new epoch in a new order
                order, cursor = torch.randperm(len(train), generator=gen), 0
            batch = train[order[cursor : cursor + cfg.batch]]
            cursor += cfg.batch
            loss = _kl(student, ffns, batch, _teacher(fwd, batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(kl=f"{loss.item():.4f}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
                with torch.no_grad():
                    curve.append(
                        ((step + 1) * cfg.batch * cfg.window, _kl(student, ffns, val, val_teacher).item())
                    )
    with torch.no_grad():
        after = _kl(student, ffns, val, val_teacher).item()
    for s, layer in zip(students, layers):
        s.write_back(layer)
    tokens = steps * cfg.batch * cfg.window
    stats = FinetuneStats(tokens, steps, before, after, time.perf_counter() - t0, [*curve, (tokens, after)])
    return stats, {name: p.detach().clone() for name, p in student.trainable.items()}
