"""Runs a model over long text cut into fixed windows, several windows per forward step, and
hands back every position's logits (teacher forcing). Perplexity, traces and calibration use it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..engine.batch import StepBatch
from ..engine.context import ForwardContext
from ..engine.kv_cache import KVCache
from ..errors import ConfigError
from ..layers.rope import Rotary
from ..loader.load import LoadedModel


@dataclass
class WindowOutput:
    tokens: list[int]
    logits: torch.Tensor  # [n, V] fp32
    routes: dict | None  # layer -> (weights [n, K], ids [n, K])
    inputs: dict | None = None  # layer -> its MoE block's input [n, H], fp32 (when asked for)


def split(ids: list[int], length: int, max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens; a short tail is kept when it has ≥ 2 tokens."""
    if length < 2:
        raise ConfigError(f"window length must be at least 2 tokens, got {length}")
    ids = ids[:max_tokens] if max_tokens else ids
    out = [ids[i : i + length] for i in range(0, len(ids), length)]
    return [w for w in out if len(w) >= 2]


def run_windows(
    lm: LoadedModel,
    windows: list[list[int]],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    top_k: int | None = None,
    batch: int = 4,
    routes: bool = False,
    progress: bool = True,
    desc: str = "scoring",
    inputs: bool = False,
) -> Iterator[WindowOutput]:
    if not windows:
        raise ConfigError("the text is too short: it gives no window of at least 2 tokens")
    limit = lm.args.max_position
    longest = max(len(w) for w in windows)
    if longest > limit:
        raise ConfigError(f"window of {longest} tokens exceeds the model's context ({limit})")
    if top_k is not None and not 0 < top_k <= lm.args.moe.n_experts:
        raise ConfigError(f"experts top_k must be in 1..{lm.args.moe.n_experts}, got {top_k}")
    cache = KVCache.for_model(lm.args, min(batch, len(windows)), longest, dtype, device)
    rotary = Rotary(lm.args.attention.rope, device)
    n_tokens = sum(len(w) for w in windows)
    with tqdm(total=n_tokens, desc=desc, unit="tok", disable=not progress, leave=False) as bar:
        for i in range(0, len(windows), batch):
            group = windows[i : i + batch]
            yield from _step(lm, group, cache, rotary, dtype, device, top_k, routes, inputs)
            bar.update(sum(len(w) for w in group))


def _step(lm, group, cache, rotary, dtype, device, top_k, routes, inputs) -> Iterator[WindowOutput]:
    b = len(group)
    sb = StepBatch.build(group, [0] * b, list(range(b)), device, lm.args.attention.sliding_window)
    row_k = None if top_k is None else [top_k] * b
    ctx = ForwardContext(
        sb,
        cache,
        lm.experts,
        rotary,
        dtype,
        row_k,
        routes={} if routes else None,
        inputs={} if inputs else None,
    )
    logits = lm.model(ctx, all_logits=True).cpu()  # [T, V]
    start = 0
    for w in group:
        end = start + len(w)
        r = (
            None
            if ctx.routes is None
            else {k: (v[0][start:end], v[1][start:end]) for k, v in ctx.routes.items()}
        )
        x = None if ctx.inputs is None else {k: v[start:end] for k, v in ctx.inputs.items()}
        yield WindowOutput(w, logits[start:end], r, x)
        start = end
