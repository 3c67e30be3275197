"""`moeflow convert dense-to-moe`: the whole conversion, from a dense model to a checkpoint folder."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import ConfigError
from .calibrate import ffn_inputs
from .dense import DenseModel, read_dense, write_folder
from .finetune import FinetuneStats, check_tokens, finetune
from .moefy import SAVE_DTYPES, ConvertConfig, convert_layer, layer_tensors

MODEL_TYPE = "moeflow_llama_moe"


@dataclass
class ConvertSummary:
    out: str
    experts: int
    shared: int
    top_k: int
    dense_layers: int  # the first layers, whose FFN stayed dense
    expert_width: int
    active_share: float  # FFN neurons computed per token
    calibration_tokens: int
    router_mass_recall: float  # mean over layers: share of the best top-k mass the router picks
    seconds: float
    finetune: FinetuneStats | None = None


def moe_config(dense: DenseModel, cfg: ConvertConfig, n_tokens: int) -> dict:
    m = dense.config["intermediate_size"] // cfg.experts
    c = dict(dense.config)
    c.update(
        model_type=MODEL_TYPE,
        architectures=["MoeflowLlamaMoeForCausalLM"],
        torch_dtype=cfg.dtype,
        num_experts=cfg.routed,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=m,
        shared_expert_intermediate_size=cfg.shared * m,
        first_k_dense_replace=cfg.dense_layers,  # (DeepSeek's name for it)
        moeflow_conversion={**asdict(cfg), "source": dense.source, "calibration_tokens": n_tokens},
    )
    return c


def convert(
    dense: DenseModel,
    out: Path,
    cfg: ConvertConfig,
    calibration: str | list[int],
    progress: bool = True,
    inputs: list | None = None,
) -> ConvertSummary:
    """calibration: text, or token ids; inputs: FFN inputs already recorded by calibrate.ffn_inputs
    (reused across conversions; the end-to-end step still needs the calibration ids)."""
    t0 = time.perf_counter()
    cfg.check(dense.config["intermediate_size"], dense.n_layers)
    ids = calibration if isinstance(calibration, list) else _encode(dense, calibration)
    tune = cfg.finetune.tokens > 0 and cfg.top_k < cfg.routed  # with every expert on, it is the dense model
    if tune:
        check_tokens(cfg.finetune, len(ids))  # before the slow layer-by-layer pass
    if inputs is None:
        inputs = ffn_inputs(dense, ids, cfg.calibration_tokens, progress)
    inputs = list(inputs)  # entries are dropped as layers are done; the caller's list stays whole
    n_tokens = inputs[0].shape[0]
    first = cfg.dense_layers  # layers before it keep their dense FFN
    layers = []
    for i in tqdm(range(dense.n_layers), desc="converting", unit="layer", disable=not progress):
        if i >= first:
            layers.append(convert_layer(inputs[i], *dense.ffn(i), cfg))
        inputs[i] = None  # frees this layer's calibration states
    tuned, trained = (
        finetune(dense, layers, ids, cfg.top_k, cfg.finetune, progress, first) if tune else (None, {})
    )
    dense_ffn = tuple(f"model.layers.{i}.mlp." for i in range(first))
    tensors = {
        k: v for k, v in dense.tensors.items() if ".mlp." not in k or k.startswith(dense_ffn)
    } | trained
    for i, layer in enumerate(layers, start=first):
        tensors.update(layer_tensors(i, layer))
    recall = [layer.stats.get("recall_trained", layer.stats["recall_centroid"]) for layer in layers]
    write_folder(out, moe_config(dense, cfg, n_tokens), saved_as(tensors, cfg.dtype), dense.tokenizer)
    return ConvertSummary(
        out=str(out),
        experts=cfg.experts,
        shared=cfg.shared,
        top_k=cfg.top_k,
        dense_layers=cfg.dense_layers,
        expert_width=dense.config["intermediate_size"] // cfg.experts,
        active_share=cfg.active_share(dense.n_layers),
        calibration_tokens=n_tokens,
        router_mass_recall=float(np.mean(recall)),
        seconds=time.perf_counter() - t0,
        finetune=tuned,
    )


def saved_as(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Weights in the checkpoint's dtype, as real MoE checkpoints ship (bf16 halves the bytes an
    expert store reads); routers and norm weights stay float32."""
    want = SAVE_DTYPES[dtype]
    keep = (".mlp.gate.weight", "norm.weight")
    return {k: v if k.endswith(keep) or not v.is_floating_point() else v.to(want) for k, v in tensors.items()}


def _encode(dense: DenseModel, text: str) -> list[int]:
    if dense.tokenizer is None:
        raise ConfigError(f"{dense.source} has no tokenizer to encode the calibration text")
    return dense.tokenizer.encode(text, add_special_tokens=False)


def convert_path(src: str, out: str, cfg: ConvertConfig, calibration: str, progress: bool = True):
    out_path = Path(out).expanduser()
    if out_path.exists():
        raise ConfigError(f"output folder already exists: {out_path}")
    dense = read_dense(src)
    cfg.check(dense.config["intermediate_size"], dense.n_layers)  # before the slow calibration pass
    return convert(dense, out_path, cfg, calibration, progress)
