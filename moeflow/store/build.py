"""Builds the tiered store a StoreConfig asks for, with its budget checked against the model."""

from __future__ import annotations

import sys

import torch

from ..cache.capacity import CacheCapacity
from ..cache.registry import PolicyContext, make_policy
from ..errors import ConfigError
from ..models.args import ModelArgs
from . import aio
from .aio_direct import AioDirectExperts, direct_layout
from .aio_experts import AioExperts, usable
from .aio_native import NativeAioExperts
from .aio_native import usable as native_step_usable
from .budget import parse_size
from .cached import SlotSpec
from .config import StoreConfig
from .extents import expert_map
from .predict import model_trace
from .reader import FileReader
from .tiered import TieredExperts


def capacity_for(cfg: StoreConfig, args: ModelArgs, expert_bytes: int) -> CacheCapacity | None:
    """Experts the budget holds; None when it holds every expert (then all stay resident)."""
    L, E, K = len(args.moe_layers), args.moe.n_experts, args.moe.top_k
    total = L * E * expert_bytes
    budget = parse_size(cfg.expert_memory, total)
    if budget >= total:
        return None
    n = budget // expert_bytes
    per_layer = n // L if cfg.scope == "layer" else None
    have = per_layer if cfg.scope == "layer" else n
    if have < K:
        least = K * expert_bytes * (L if cfg.scope == "layer" else 1)
        raise ConfigError(
            f"expert memory {cfg.expert_memory} holds {have} experts "
            f"{'per layer' if cfg.scope == 'layer' else 'in all'} of {expert_bytes / 2**20:.2f} MiB, "
            f"fewer than the {K} one layer runs at once (top-k); give at least {least} bytes"
        )
    return CacheCapacity(per_layer=per_layer) if cfg.scope == "layer" else CacheCapacity(total=n)


def slot_spec(cfg: StoreConfig, args: ModelArgs, dtype: torch.dtype) -> SlotSpec | None:
    """The slots cfg's budget buys for this model; None when it holds every expert."""
    m = args.moe
    cap = capacity_for(cfg, args, 3 * m.intermediate * args.hidden * dtype.itemsize)
    if cap is None:
        print(
            f"moeflow: expert memory {cfg.expert_memory} covers every expert: all stay resident",
            file=sys.stderr,
        )
        return None
    profile = None
    if cfg.policy == "pinned":
        if cfg.trace is None:
            raise ConfigError(
                "policy pinned pins the experts a recorded trace used most: give --expert-trace TRACE"
            )
        profile = model_trace(cfg.trace, args.moe_layers, m.n_experts).profile()
    ctx = PolicyContext(
        n_layers=len(args.moe_layers), n_experts=m.n_experts, top_k=m.top_k, capacity=cap, profile=profile
    )
    policy = make_policy(cfg.policy, ctx)
    return SlotSpec(args.moe_layers, m.n_experts, m.intermediate, args.hidden, dtype, cap, policy)


def tiered_store(
    ckpt, canon, args: ModelArgs, dtype: torch.dtype, cfg: StoreConfig, pin: bool = False
) -> TieredExperts | None:
    """Experts in RAM over the disk. pin: page-locked slots (the host tier under a GPU's)."""
    spec = slot_spec(cfg, args, dtype)
    if spec is None:
        return None
    m = args.moe
    emap = expert_map(ckpt, canon, args.moe_layers, m.n_experts, m.intermediate, args.hidden)
    reader = FileReader(emap.files)  # opened once, whichever store reads through it
    if cfg.io != "threads" and aio.available() and usable(reader, emap):
        try:
            layout = None if pin else direct_layout(emap, dtype, m.intermediate, args.hidden)
            if layout is not None:  # reads land in the slots themselves
                if native_step_usable(spec):  # each layer's step in one native call
                    return NativeAioExperts(emap, spec, reader, layout)
                return AioDirectExperts(emap, spec, reader, layout)
            return AioExperts(emap, spec, reader, cfg.io_threads, pin)
        except OSError as e:  # e.g. the system's AIO request limit (aio-max-nr) is used up
            if cfg.io == "aio":
                reader.close()
                raise ConfigError(f"expert io aio: cannot set up Linux AIO: {e.strerror}") from None
    elif cfg.io == "aio":
        reader.close()
        raise ConfigError(
            "expert io aio needs Linux AIO and checkpoint files that take O_DIRECT; use auto or threads"
        )
    return TieredExperts(emap, spec, cfg.io_threads, pin, reader)
