"""`moeflow simulate`: replay a routing trace through expert-cache policies and prefetchers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cache import POLICIES, CacheCapacity
from ..cache.predictors import PREDICTORS
from ..errors import ConfigError
from ..sim import SimConfig, SimResult, Trace, load_trace, simulate
from ..sim.report import results_table, sweep_table


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay a routing trace through expert-cache policies (hit rate, bytes moved, time)",
        description="Replays a routing trace (from `moeflow trace`) token by token through an expert "
        "cache. The first --fit-fraction of the tokens fits the pinned hot set and the learned "
        "predictor and warms the cache; figures count the rest.",
    )
    p.add_argument("--trace", required=True, help="routing trace file (.npz, moeflow-trace-v1)")
    p.add_argument("--capacity", help="experts the cache holds: N, or N,M,... to compare several")
    p.add_argument(
        "--capacity-scope",
        choices=["layer", "global"],
        default="layer",
        help="capacity per MoE layer (default) or one capacity over all layers",
    )
    p.add_argument("--policy", default="lru", help=f"{', '.join(POLICIES)}, a comma list, or all")
    p.add_argument(
        "--predictor", help=f"prefetch with {', '.join(PREDICTORS)}, a comma list, or all (default: none)"
    )
    p.add_argument("--prefetch-depth", type=int, default=1, help="layers ahead a prefetch is issued")
    p.add_argument("--prefetch-n", type=int, help="experts prefetched per layer (default: top-k)")
    p.add_argument("--bandwidth", type=float, default=25.0, help="slow to fast tier, GB/s (default 25)")
    p.add_argument("--expert-bytes", type=int, help="bytes of one expert (default: the trace's)")
    p.add_argument("--compute-ms-per-layer", type=float, default=1.0, help="per token (default 1.0)")
    p.add_argument(
        "--expert-share",
        type=float,
        default=0.0,
        help="share of a layer's compute that is its routed experts: those in memory compute while "
        "the misses load, as moeflow's decode does (default 0: loads precede the layer's compute)",
    )
    p.add_argument("--fit-fraction", type=float, default=0.5, help="share of tokens to fit on (0.5)")
    p.add_argument("--pin-fraction", type=float, default=0.5, help="pinned: share of capacity (0.5)")
    p.add_argument("--half-life", type=float, default=32.0, help="reuse: half-life in tokens (32)")
    p.add_argument("--window", type=int, default=16, help="frequency predictor: tokens back (16)")
    p.add_argument("--max-tokens", type=int, help="replay only the first N tokens")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="compare capacities from top-k up to --capacity (default: every expert)",
    )
    p.add_argument("--plot", metavar="PNG", help="save hit rate against capacity as a PNG")
    p.add_argument("--json", metavar="FILE", help="save every result as JSON")


def run(a: argparse.Namespace) -> int:
    trace = load_trace(a.trace)
    capacities = _capacities(a.capacity, a.sweep, a.capacity_scope, trace)
    policies = _names(a.policy, POLICIES, "policy")
    predictors = [None] if a.predictor is None else _names(a.predictor, PREDICTORS, "predictor")
    results = [
        simulate(trace, _config(a, CacheCapacity.of(c, a.capacity_scope), policy, predictor))
        for c in capacities
        for policy in policies
        for predictor in predictors
    ]
    print(_describe(trace, results[0]))
    print(sweep_table(results) if len(capacities) > 1 else results_table(results))
    if a.json:
        _write_json(Path(a.json), a.trace, trace, results)
    if a.plot:
        from ..sim.plot import plot_sweep

        try:
            plot_sweep(results, a.plot, f"{Path(trace.meta.model).name}: expert-cache hit rate")
        except OSError as e:
            raise ConfigError(f"cannot write {a.plot}: {e.strerror}") from None
    return 0


def _config(a: argparse.Namespace, capacity: CacheCapacity, policy: str, predictor: str | None) -> SimConfig:
    return SimConfig(
        capacity=capacity,
        policy=policy,
        predictor=predictor,
        prefetch_depth=a.prefetch_depth,
        prefetch_n=a.prefetch_n,
        bandwidth_gbs=a.bandwidth,
        expert_bytes=a.expert_bytes,
        compute_ms=a.compute_ms_per_layer,
        expert_share=a.expert_share,
        fit_fraction=a.fit_fraction,
        pin_fraction=a.pin_fraction,
        half_life=a.half_life,
        window=a.window,
        max_tokens=a.max_tokens,
    )


def _capacities(spec: str | None, sweep: bool, scope: str, trace: Trace) -> list[int]:
    try:
        given = [int(x) for x in spec.split(",")] if spec else []
    except ValueError:
        raise ConfigError(f"--capacity wants N or N,M,...; got {spec!r}") from None
    if len(given) > 1 or (given and not sweep):
        return given
    if not sweep:
        raise ConfigError("give --capacity N (or --sweep to compare a range)")
    per = 1 if scope == "layer" else trace.n_layers
    every = trace.meta.n_experts * per  # beyond this everything fits
    top = min(given[0], every) if given else every
    low = trace.width * per
    if top < low:
        return [top]  # too small: simulate() says why
    if top - low <= 12:
        return list(range(low, top + 1))
    return sorted({round(low * 2 ** (i / 2)) for i in range(64) if low * 2 ** (i / 2) < top} | {top})


def _names(spec: str, known: tuple[str, ...], what: str) -> list[str]:
    names = list(known) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(
            f"unknown {what} {', '.join(unknown) or repr(spec)} (known: {', '.join(known)}, all)"
        )
    return names


def _describe(trace: Trace, first: SimResult) -> str:
    m = trace.meta
    return (
        f"trace {m.model}: {trace.n_tokens} tokens x {trace.n_layers} MoE layers, {m.n_experts} experts, "
        f"top-{m.top_k}, {m.expert_bytes / 1e6:.1f} MB/expert; measured on tokens "
        f"{first.first_token}..{first.first_token + first.tokens - 1}"
    )


def _write_json(path: Path, source: str, trace: Trace, results: list[SimResult]) -> None:
    m = trace.meta
    doc = {
        "trace": {"path": str(source), "model": m.model, "tokens": trace.n_tokens, "layers": trace.n_layers}
        | {"n_experts": m.n_experts, "top_k": m.top_k, "expert_bytes": m.expert_bytes},
        "results": [r.to_dict() for r in results],
    }
    try:
        path.write_text(json.dumps(doc, indent=2))
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None
