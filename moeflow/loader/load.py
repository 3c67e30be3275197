"""Builds a model on the meta device and streams checkpoint tensors into it: non-expert weights
become module parameters, expert weights go to the expert store."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError
from ..expert_store import ResidentExperts
from ..models.args import ModelArgs
from ..models.registry import parse_args
from ..models.transformer import CausalLM
from ..store.build import slot_spec, tiered_store
from ..store.cached import CachedExperts
from ..store.config import StoreConfig
from ..store.device import DeviceExperts, pinned
from ..store.predict import make_engine_predictor
from .checkpoint import Checkpoint, MemoryCheckpoint
from .experts import check_shape, layer_experts

# small routing tensors stay fp32 in every compute dtype: expert choice is sensitive to rounding
_KEEP_FP32 = (".mlp.gate.weight", ".e_score_correction_bias")


@dataclass
class LoadedModel:
    model: CausalLM
    experts: ResidentExperts | CachedExperts  # resident, or a budgeted cache (RAM over disk, device over RAM)
    args: ModelArgs
    checkpoint: Checkpoint
    path: Path


def load(
    path: str | Path | MemoryCheckpoint,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    progress: bool = True,
    store: StoreConfig | None = None,
) -> LoadedModel:
    """store: where experts live (default: all resident in memory)."""
    ckpt = path if isinstance(path, MemoryCheckpoint) else Checkpoint(path)
    args, fam = parse_args(ckpt.config)
    with torch.device("meta"):
        model = CausalLM(args, fam.route(args))
    canon = {fam.sanitize(k): k for k in ckpt.keys()}
    names = [n for n, _ in model.named_parameters()]
    budgeted = store is not None and store.tiered and bool(args.moe_layers)
    on_device = torch.device(device).type != "cpu"
    if store is not None and store.host_memory is not None and not (budgeted and on_device):
        raise ConfigError(
            "--host-memory budgets the RAM tier under an accelerator's expert cache: it needs "
            "--expert-memory and a --device other than cpu"
        )
    device_spec = slot_spec(store, args, dtype) if budgeted and on_device else None
    if on_device and device_spec is None:
        budgeted = False  # (no budget, or one that holds every expert: all resident on the device)
    tiered = None
    if budgeted:  # on CPU the budget is RAM's, over the disk; on a device, the RAM tier is the host's
        host_cfg = replace(store, expert_memory=store.host_memory, prefetch="none") if on_device else store
        if host_cfg.expert_memory is not None:
            tiered = tiered_store(ckpt, canon, args, dtype, host_cfg, pin=on_device)
    n_steps = len(names) + (0 if tiered else len(args.moe_layers))
    with tqdm(total=n_steps, desc="loading", unit="tensor", disable=not progress, leave=False) as bar:
        state = {}
        for name, p in model.named_parameters():
            state[name] = _dense_tensor(ckpt, canon, name, tuple(p.shape), args, dtype, device)
            bar.update()
        if args.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        host_device = "cpu" if device_spec is not None else device  # a device tier's host is RAM
        experts = tiered or _load_experts(ckpt, canon, args, dtype, host_device, bar)
    if device_spec is not None:
        if tiered is None:
            pinned(experts)  # page-locked, so host-to-device copies are asynchronous
        experts = DeviceExperts(experts, device_spec, device, store.on_miss)
    model.eval()
    if isinstance(experts, CachedExperts):
        m = args.moe
        experts.predictor = make_engine_predictor(
            store.prefetch, model, args.moe_layers, m.n_experts, m.top_k, store.trace
        )
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "fuse_qkv"):
            layer.self_attn.fuse_qkv()
    return LoadedModel(model=model, experts=experts, args=args, checkpoint=ckpt, path=ckpt.path)


def _dense_tensor(ckpt, canon, name, shape, args, dtype, device) -> torch.Tensor | None:
    if name == "lm_head.weight" and args.tie_embeddings:
        return None  # filled from the embedding
    src = canon.get(name)
    if src is None:
        raise CheckpointError(f"tensor {name} is missing from the checkpoint")
    check_shape(src, ckpt.shape(src), shape)
    want = torch.float32 if name.endswith(_KEEP_FP32) else dtype
    return ckpt.read(src).to(device=device, dtype=want)  # a private copy, not the file's mmap


def _load_experts(ckpt, canon, args: ModelArgs, dtype, device, bar) -> ResidentExperts:
    m = args.moe
    store = ResidentExperts(args.moe_layers, m.n_experts, args.hidden, m.intermediate, dtype, device)
    for layer in args.moe_layers:
        for e, gate, up, down in layer_experts(ckpt, canon, layer, m.n_experts, m.intermediate, args.hidden):
            store.put(layer, e, gate, up, down)
        bar.update()
    return store
