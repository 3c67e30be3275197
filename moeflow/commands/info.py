"""`moeflow info`: what the checkpoint is, without loading its weights."""

from __future__ import annotations

import re
from pathlib import Path

from ..llm import resolve_dtype
from ..loader.checkpoint import Checkpoint
from ..models.registry import parse_args
from ..params import count_params
from .format import human


def run(a) -> int:
    if a.model is None:
        from ..default_model import default_model_path

        a.model = default_model_path()
    ckpt = Checkpoint(Path(a.model))
    args, fam = parse_args(ckpt.config)
    pc = count_params(args)
    nbytes = resolve_dtype(a.dtype).itemsize
    at, m = args.attention, args.moe
    expert_names = [k for k in ckpt.keys() if ".experts." in fam.sanitize(k)]
    on_disk = sum(ckpt.nbytes(k) for k in ckpt.keys())
    expert_bytes = sum(ckpt.nbytes(k) for k in expert_names)
    lines = [
        f"model        {ckpt.path}",
        f"family       {args.model_type}  "
        f"({args.n_layers} layers, hidden {args.hidden}, vocab {args.vocab_size})",
        f"attention    {_attention(at)}",
        f"moe          {m.n_experts} experts x {m.intermediate} wide, top-{m.top_k}, {_routing(m)}",
        f"moe layers   {len(args.moe_layers)} of {args.n_layers}"
        + (f" (dense: {_dense(args)})" if len(args.moe_layers) < args.n_layers else ""),
        f"params       {human(pc.total)} total | {human(pc.active)} active per token "
        f"({100 * pc.active / pc.total:.1f}%) | {human(pc.per_expert)} per expert | "
        f"{human(pc.expert_total)} in experts ({100 * pc.expert_total / pc.total:.1f}%)",
        f"per token    {human(pc.touched_per_token() * nbytes, 'B')} of weights read at batch 1 in {a.dtype} "
        f"(all non-expert weights but the embedding table, plus {m.top_k} experts per MoE layer)",
        f"on disk      {human(on_disk, 'B')} in {len(ckpt.files)} file(s)",
        f"experts      {len(expert_names)} tensors ({human(expert_bytes, 'B')} on disk): "
        + "; ".join(_patterns(expert_names)),
    ]
    print("\n".join(lines))
    return 0


def _patterns(names: list[str]) -> list[str]:
    """Collapses layer and expert numbers: model.layers.{L}.mlp.experts.{E}.up_proj.weight"""
    out = {
        re.sub(r"experts\.\d+\.", "experts.{E}.", re.sub(r"layers\.\d+\.", "layers.{L}.", n)) for n in names
    }
    return sorted(out)


def _attention(at) -> str:
    if at.kind == "mla":
        q = f"q LoRA {at.q_lora_rank}" if at.q_lora_rank else "full q"
        rope = f"rope dim {at.qk_rope_head_dim}"
        return f"latent (MLA), {at.n_heads} heads, kv LoRA {at.kv_lora_rank}, {q}, {rope}"
    extra = "" if at.qk_norm == "none" else f", qk-norm {at.qk_norm}"
    rope = f"rope {at.rope.kind} theta {at.rope.theta:g}"
    return f"GQA {at.n_heads}/{at.n_kv_heads} heads x {at.head_dim}{extra}, {rope}"


def _routing(m) -> str:
    parts = [f"{m.scoring} scores", "renormalised" if m.renormalize else "not renormalised"]
    if m.n_group > 1:
        parts.append(f"{m.topk_group} of {m.n_group} groups")
    if m.score_bias:
        parts.append("bias-corrected choice")
    if m.routed_scale != 1:
        parts.append(f"scaled x{m.routed_scale:g}")
    if m.shared_intermediate:
        parts.append(f"shared expert {m.shared_intermediate} wide" + (" (gated)" if m.shared_gate else ""))
    return ", ".join(parts)


def _dense(args) -> str:
    return ",".join(str(i) for i in range(args.n_layers) if i not in args.moe_layers)
