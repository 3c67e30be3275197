"""Routing traces: which experts every token chose in every MoE layer, for cache replay.

File format (`.npz`, numpy.savez_compressed), format id "moeflow-trace-v1":
- experts  int16   [T, L, K]  expert ids per token and MoE layer (L = len(meta.moe_layers)), -1 = unused slot
- weights  float32 [T, L, K]  routing weights of those experts
- tokens   int32   [T]        token ids, in the order the model saw them
- seq      int32   [T]        index of the window (sequence) each token belongs to
- meta     0-d str            JSON: format, model, model_type, moe_layers, n_experts, top_k,
                              hidden, expert_intermediate, dtype, and expert_bytes (gate, up and
                              down of one expert at the checkpoint dtype)
- lookahead float32 [L-1, E, H+1]  optional: the learned look-ahead fitted on this text (row e of
                              map i scores expert e of MoE layer i+1 from layer i's router input,
                              last column the bias; store/learned.py); absent when the model is too
                              wide to fit it (store.learned.MAX_FIT_BYTES) or has one MoE layer"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..loader.load import LoadedModel
from ..store.learned import LookaheadFit
from .windows import run_windows, split

FORMAT = "moeflow-trace-v1"


@dataclass
class TraceSummary:
    path: str
    tokens: int
    layers: int
    top_k: int
    seconds: float


def trace_meta(lm: LoadedModel, top_k: int) -> dict:
    a, m = lm.args, lm.args.moe
    ckpt = lm.checkpoint
    names = [k for k in ckpt.keys() if ".experts." in k]
    itemsize = ckpt.get(names[0]).element_size() if names else 4
    return {
        "format": FORMAT,
        "model": str(lm.path),
        "model_type": a.model_type,
        "moe_layers": list(a.moe_layers),
        "n_experts": m.n_experts,
        "top_k": top_k,
        "hidden": a.hidden,
        "expert_intermediate": m.intermediate,
        "expert_bytes": 3 * a.hidden * m.intermediate * itemsize,
        "dtype": str(ckpt.get(names[0]).dtype).removeprefix("torch.") if names else "float32",
    }


def record(
    lm: LoadedModel,
    ids: list[int],
    window: int = 512,
    max_tokens: int | None = None,
    top_k: int | None = None,
    progress: bool = True,
    fit_lookahead: bool = True,
) -> dict[str, np.ndarray]:
    """Runs the text through the model and returns the trace arrays (meta included), with the
    learned look-ahead fitted on the same text unless fit_lookahead is False."""
    if not lm.args.moe_layers:
        raise ConfigError("this model has no MoE layers, so there is no routing to trace")
    k = top_k or lm.args.moe.top_k
    layers = lm.args.moe_layers
    experts, weights, seq = [], [], []
    fit = None
    if fit_lookahead and len(layers) > 1 and LookaheadFit.affordable(len(layers), lm.args.hidden):
        fit = LookaheadFit([lm.model.model.layers[i].mlp.gate.weight for i in layers])
    wins = split(ids, window, max_tokens)
    runs = run_windows(
        lm, wins, top_k=top_k, routes=True, progress=progress, desc="tracing", inputs=fit is not None
    )
    for n, out in enumerate(runs):
        w = torch.stack([out.routes[layer][0] for layer in layers], dim=1)  # [n, L, K]
        e = torch.stack([out.routes[layer][1] for layer in layers], dim=1)
        weights.append(w.float().numpy())
        experts.append(e.to(torch.int16).numpy())
        seq.append(np.full(len(out.tokens), n, dtype=np.int32))
        if fit is not None:
            fit.add([out.inputs[layer] for layer in layers])
    arrays = {
        "experts": np.concatenate(experts),
        "weights": np.concatenate(weights),
        "tokens": np.asarray([t for w in wins for t in w], dtype=np.int32),
        "seq": np.concatenate(seq),
        "meta": np.asarray(json.dumps(trace_meta(lm, k))),
    }
    if fit is not None:
        arrays["lookahead"] = fit.solve()
    return arrays


def save(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path).expanduser()
    if path.suffix != ".npz":
        raise ConfigError(f"trace output must end in .npz, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
