"""Tiered expert store benchmark: decode speed, reads, stalls and peak RSS under expert budgets.

Every configuration runs in its own process (peak RSS is per process, and no run inherits
another's page cache or allocator state); the parent probes disk bandwidth in the same run.

    python bench/bench_store.py real  --model bench/.cache/smollm2-moe-e32k8 --out bench/out/real.json
    python bench/bench_store.py scale --model bench/.cache/qwen3-30b-shape --out bench/out/store-scale.json
    python bench/bench_store.py dense --models CONVERTED... --rounds 3   # converted vs dense decode

real:  a converted SmolLM2-MoE (default: the built-in one; real text, real routing). Budgets
       10/25/50% of expert bytes against naive on-demand loading (a budget of one layer's top-k,
       no prefetch) and all in RAM; every policy and predictor at 25%; every policy against
       Belady in the simulator on a trace of held-out text.
scale: a random-weight checkpoint with >= 8 GB of experts; the same budgets, plus llama.cpp on
       the same weights (GGUF, mmap), and the simulator's modelled time checked against the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


# ---------------------------------------------------------------- child: one configuration


def drop_page_cache(files) -> None:
    """Evicts the files' clean pages from the page cache, so a run reads them from disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def vm(field: str = "VmRSS") -> int:
    """Bytes of /proc/self/status's field: VmRSS now, VmHWM the peak. (Not ru_maxrss: Linux
    carries it across fork and exec, so a child would report its parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> dict:
    import torch

    from moeflow.engine.sampling import SamplingParams
    from moeflow.llm import LLM

    base_rss = vm()  # python + torch + moeflow imported, nothing loaded
    if not spec.get("native_step", True):  # the in-slot AIO store keeps its Python step
        from moeflow.store import build

        build.native_step_usable = lambda slots: False
    drop_page_cache(Path(spec["model"]).glob("*.safetensors"))  # every configuration starts cold
    t0 = time.perf_counter()
    llm = LLM(
        spec["model"],
        dtype=spec.get("dtype", "float32"),
        progress=False,
        expert_memory=spec.get("budget"),
        expert_policy=spec.get("policy", "lru"),
        prefetch=spec.get("prefetch", "lookahead"),
        expert_trace=spec.get("trace"),
        expert_io=spec.get("io", "auto"),
        expert_io_threads=spec.get("io_threads", 4),
    )
    load_s = time.perf_counter() - t0
    experts = llm.loaded.experts
    routes: list[np.ndarray] = []
    prompt_routes: list[np.ndarray] = []  # one [P, K] per layer: the prompt warms the cache
    if spec.get("record") and experts is not None:  # this run's own routing, for the simulator check
        inner = getattr(experts, "on_route", None)

        def record(layer, x, ids):
            (routes if ids.shape[0] == 1 else prompt_routes).append(ids.numpy().astype(np.int16))
            if inner is not None:
                inner(layer, x, ids)

        experts.on_route = record
    dense = sum(p.numel() * p.element_size() for p in llm.loaded.model.parameters())
    dense -= (
        llm.loaded.model.lm_head.weight.numel() * llm.loaded.model.lm_head.weight.element_size()
        if llm.args.tie_embeddings
        else 0
    )
    # greedy on the real model; sampled (fixed seed) on random weights, whose greedy output repeats
    # one token and so would route with a locality that random weights do not have
    sp = SamplingParams(
        max_tokens=spec["tokens"], temperature=spec.get("temperature", 0.0), seed=0, ignore_eos=True
    )
    before = None
    if spec.get("warmup"):  # steady state: the cache already holds what other text routed to
        llm.generate(prompt_token_ids=[spec["warmup"]], sampling_params=sp)
        before, routes[:], prompt_routes[:] = llm.expert_stats(), [], []
    t0 = time.perf_counter()
    out = llm.generate(prompt_token_ids=[spec["prompt"]], sampling_params=sp)[0]
    wall = time.perf_counter() - t0
    st = out.stats
    res = {
        "name": spec["name"],
        "load_s": load_s,
        "prefill_tps": st.prefill_tps,
        "decode_tps": st.decode_tps,
        "decode_tokens": st.decode_tokens,
        "wall_s": wall,
        "tokens": out.token_ids,
        "store": since(llm.expert_stats(), before),
        "dense_bytes": dense,
        "base_rss": base_rss,
        "peak_rss": vm("VmHWM"),
        "threads": torch.get_num_threads(),
    }
    L = len(llm.args.moe_layers)
    if routes:
        steps = np.concatenate(routes)  # [steps, K]: decode layer-steps in run order
        res["routes"] = steps[: len(steps) // L * L].reshape(-1, L, steps.shape[1]).tolist()
    if prompt_routes and len(prompt_routes) % L == 0:  # [P, L, K], over the prefill's chunks
        chunks = [np.stack(prompt_routes[i : i + L], axis=1) for i in range(0, len(prompt_routes), L)]
        res["prompt_routes"] = np.concatenate(chunks).tolist()
    return res


COUNTERS = (
    "hits",
    "misses",
    "prefetches",
    "prefetch_hits",
    "wasted_prefetches",
    "bytes_read",
    "demand_bytes",
    "demand_read_s",
    "stall_s",
    "store_s",
)


def since(now: dict | None, before: dict | None) -> dict | None:
    """Store statistics of the measured request alone, when a warm-up request came first."""
    if now is None or before is None:
        return now
    d = dict(now) | {k: now[k] - before[k] for k in COUNTERS}
    d["hit_rate"] = d["hits"] / max(1, d["hits"] + d["misses"])
    return d


def run_child(spec: dict) -> dict:
    """Runs one configuration in a fresh interpreter; returns its JSON result."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise SystemExit(f"configuration {spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parent: the cases


def expert_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def disk_probe(model: Path) -> dict:
    from diskbw import probe

    files = expert_files(model)
    return {
        "direct_gbs": probe(files, 1.0, threads=1, direct=True),
        "direct_x4_gbs": probe(files, 1.0, threads=4, direct=True),
        "dropped_gbs": probe(files, 1.0, threads=1, direct=False),
    }


def budget_bytes(share: float, g: dict) -> int:
    return int(share * g["n_moe_layers"] * g["n_experts"] * g["expert_bytes"])


def summarise(r: dict) -> str:
    s = r.get("store") or {}
    extra = ""
    if s:
        read_gbs = s["demand_bytes"] / s["demand_read_s"] / 1e9 if s.get("demand_read_s") else 0.0
        rec = s.get("recall")
        extra = (
            f" hit {s['hit_rate']:.1%} read {s['bytes_read'] / 2**20:.0f} MiB stall {s['stall_s']:.2f}s"
            f" store work {s['store_s'] - s['stall_s']:.2f}s"
            f" demand-read {read_gbs:.2f} GB/s" + (f" P/R {s['precision']:.2f}/{rec:.2f}" if rec else "")
        )
    return f"{r['name']:<28} {r['decode_tps']:7.2f} tok/s  rss {r['peak_rss'] / 2**20:6.0f} MiB{extra}"


def with_threads(specs: list[dict], endings: tuple[str, ...]) -> list[dict]:
    """The naive runs and those whose names end with `endings` again, with reader threads
    instead of Linux AIO (the default where it works), named "... threads"."""
    return [
        s | {"name": s["name"] + " threads", "io": "threads"}
        for s in specs
        if s["name"].startswith("naive") or s["name"].endswith(endings)
    ]


def with_python_step(specs: list[dict], endings: tuple[str, ...]) -> list[dict]:
    """The runs whose names end with `endings` again with the in-slot AIO store's Python step
    instead of its native one (store.c), named "... python step"."""
    return [
        s | {"name": s["name"] + " python step", "native_step": False}
        for s in specs
        if s["name"].endswith(endings)
    ]


def run_configs(specs: list[dict], rounds: int, only: list[str] | None = None) -> list[dict]:
    """Each configuration `rounds` times, interleaved; keeps the median-speed result of each.
    `only`: run just the configurations whose names start with one of these."""
    if only:
        specs = [s for s in specs if any(s["name"].startswith(o) for o in only)]
    got: dict[str, list[dict]] = {s["name"]: [] for s in specs}
    for _ in range(rounds):
        for spec in specs:
            r = run_child(spec)
            got[spec["name"]].append(r)
            print(summarise(r), flush=True)
    out = []
    for spec in specs:
        rs = sorted(got[spec["name"]], key=lambda r: r["decode_tps"])
        med = rs[len(rs) // 2]
        med["decode_tps_runs"] = [r["decode_tps"] for r in got[spec["name"]]]
        out.append(med)
    return out


def check_exact(results: list[dict]) -> None:
    """Marks each run whose tokens equal the first's (budgets must never change the output)."""
    want = results[0]["tokens"]
    for r in results:
        r["same_tokens"] = r["tokens"] == want
        if not r["same_tokens"]:
            print(f"WARNING: {r['name']} generated different tokens than {results[0]['name']}", flush=True)


def simulate_policies(trace_path: Path, g: dict, shares: list[float]) -> list[dict]:
    """Every policy and Belady on a recorded trace, at each budget's capacity (global)."""
    from moeflow.cache import CacheCapacity
    from moeflow.sim.simulator import SimConfig, simulate
    from moeflow.sim.trace import load_trace

    trace = load_trace(trace_path)
    rows = []
    for share in shares:
        n = budget_bytes(share, g) // g["expert_bytes"]
        for policy in ("lru", "lfu", "reuse", "cyclic", "pinned", "belady"):
            r = simulate(trace, SimConfig(CacheCapacity(total=n), policy=policy))
            rows.append({"share": share, "capacity": n, "policy": policy, "hit_rate": r.stats.hit_rate})
    return rows


def case_real(a) -> dict:
    import torch

    from moeflow.corpus import read_text
    from moeflow.default_model import default_model_path
    from moeflow.eval.trace import record, save
    from moeflow.loader.open import open_model
    from moeflow.tokenizer import encode

    model = Path(a.model) if a.model else default_model_path(progress=True)
    g = expert_geometry(model)
    lm, tok = open_model(model, progress=False)
    # held-out text for the prompt and the policy trace; calibration text fits pinned/cooccurrence
    eval_ids = encode(tok, read_text("builtin:evaluation"))
    fit_trace = BENCH / "out" / f"store-fit-{model.name}.npz"
    eval_trace = BENCH / "out" / f"store-eval-{model.name}.npz"
    save(
        fit_trace,
        record(lm, encode(tok, read_text("builtin:calibration"))[:4096], window=512, progress=False),
    )
    save(eval_trace, record(lm, eval_ids[:4096], window=512, progress=False))
    del lm
    prompt = eval_ids[5000 : 5000 + a.prompt]
    base = {
        "model": str(model),
        "prompt": prompt,
        "tokens": a.tokens,
        "trace": str(fit_trace),
        "dtype": a.dtype,
        "record": True,  # each run's routing, for the simulator check
    }
    # budgets count slots in the compute dtype, which may be wider than the checkpoint's
    slot_bytes = 3 * g["hidden"] * g["expert_intermediate"] * getattr(torch, a.dtype).itemsize
    K = g["top_k"]
    specs = [
        base | {"name": "all in RAM"},
        base | {"name": "naive (top-k, no prefetch)", "budget": K * slot_bytes, "prefetch": "none"},
        # what offloading papers call naive: each missed expert read when needed, one at a time
        base
        | {
            "name": "sequential naive (one read at a time)",
            "budget": K * slot_bytes,
            "prefetch": "none",
            "io": "threads",
            "io_threads": 1,
        },
    ]
    for share in (0.10, 0.25, 0.50):
        b = f"{share:.0%}"
        specs.append(base | {"name": f"{share:.0%} lru none", "budget": b, "prefetch": "none"})
        if share != 0.25:  # (25% cyclic none is among the predictors below)
            specs.append(
                base
                | {"name": f"{share:.0%} cyclic none", "budget": b, "policy": "cyclic", "prefetch": "none"}
            )
        specs.append(base | {"name": f"{share:.0%} cyclic lookahead", "budget": b, "policy": "cyclic"})
        learned = {"policy": "cyclic", "prefetch": "learned"}  # fitted on the calibration trace
        specs.append(base | learned | {"name": f"{share:.0%} cyclic learned", "budget": b})
    # steady state: the same runs after a warm-up request on other held-out text (a server's
    # cache is rarely empty); the all-in-RAM run is warmed the same way
    warm = {"warmup": eval_ids[9000 : 9000 + a.prompt]}
    specs.append(base | warm | {"name": "warm: all in RAM"})
    for share in (0.25, 0.50):
        b = f"{share:.0%}"
        for policy in ("cyclic", "lru"):
            specs.append(
                base
                | warm
                | {"name": f"warm: {b} {policy} none", "budget": b, "policy": policy, "prefetch": "none"}
            )
    q = "25%"
    for policy in ("lru", "lfu", "reuse", "pinned"):
        specs.append(base | {"name": f"25% {policy} lookahead", "budget": q, "policy": policy})
    for pred in ("none", "frequency", "cooccurrence"):
        specs.append(base | {"name": f"25% cyclic {pred}", "budget": q, "policy": "cyclic", "prefetch": pred})
    specs += with_threads(specs[1:], ("cyclic none", "cyclic lookahead", "cyclic learned"))
    specs += with_python_step(specs[1:], ("cyclic none", "cyclic learned"))
    from moeflow.default_model import smollm2_gguf

    specs.append(base | {"name": "dense source (GGUF, fp32)", "model": str(smollm2_gguf())})
    disk_before = disk_probe(model)
    results = run_configs(specs, a.rounds, a.only)
    disk_after = disk_probe(model)
    check_exact([r for r in results if not r["name"].startswith("dense")])
    return {
        "case": "real",
        "model": str(model),
        "geometry": g,
        "disk": [disk_before, disk_after],
        "results": results,
        "simulator": simulate_policies(eval_trace, g, [0.10, 0.25, 0.50]),
    } | simulator_check(results, g)


def child_llama(spec: dict) -> dict:
    """llama.cpp on the same weights (GGUF), memory-mapped as it runs by default."""
    import torch
    from bench_engine import LlamaCppRunner

    base_rss = vm()
    drop_page_cache([Path(spec["gguf"])])
    t0 = time.perf_counter()
    runner = LlamaCppRunner(Path(spec["gguf"]), "bf16", torch.get_num_threads(), mmap=True)
    load_s = time.perf_counter() - t0
    cold = feed(runner, spec["prompt"], spec["feed"])  # experts fault in from disk as they are used
    warm = feed(runner, spec["prompt"], spec["feed"])  # the same again, now from the page cache
    return {
        "warm_decode_tps": warm[1],
        "name": spec["name"],
        "load_s": load_s,
        "prefill_tps": cold[0],
        "decode_tps": cold[1],
        "decode_tokens": len(spec["feed"]) - 1,
        "tokens": spec["feed"],
        "store": None,
        "base_rss": base_rss,
        "peak_rss": vm("VmHWM"),
    }


def feed(runner, prompt: list[int], tokens: list[int]) -> tuple[float, float]:
    """llama.cpp decoding exactly the tokens moeflow produced (so both route the same way):
    the prompt, then each token in turn. Returns (prefill tok/s, decode tok/s)."""
    llm = runner.llm
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for tok in tokens[:-1]:
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (len(tokens) - 1) / (t2 - t1)


def modelled_vs_measured(results: list[dict], g: dict, rates: dict[str, float]) -> list[dict]:
    """Replays each budgeted run without prefetching on its own routing in the simulator (same
    capacity and policy) and compares the modelled decode ms/token with the measured one:
    - staged (the error of record): the prompt's routing warms the cache first, as it did in the
      run, and the experts in memory compute while the misses load; the experts' share of a
      layer's compute is their share of the bytes a decode token reads (decode is memory-bound);
    - serial: a cold cache and every miss's load before its layer computes (the earlier check).
    Compute per layer-step comes from the all-in-RAM run; each bandwidth of `rates` gives a column."""
    ram = next(r for r in results if r["name"] == "all in RAM")
    compute_ms = 1e3 / ram["decode_tps"] / g["n_moe_layers"]
    rows = []
    for r in results:
        if not r.get("routes") or not r.get("store") or r["store"]["predictor"] is not None:
            continue  # the look-ahead needs hidden states: no trace-only twin to replay
        share = expert_share(g, r["dense_bytes"])
        decode, prompt = r["routes"], r.get("prompt_routes", [])
        measured = 1e3 / r["decode_tps"]
        row = {"name": r["name"], "measured_ms_per_token": measured, "expert_share": share}
        for label, gbs in rates.items():
            staged = _replay(r, g, prompt + decode, len(prompt), gbs, compute_ms, share)
            serial = _replay(r, g, decode, 0, gbs, compute_ms, 0.0)
            row[label] = {
                "gbs": gbs,
                "staged_ms_per_token": staged.timing.ms_per_token,
                "staged_error": staged.timing.ms_per_token / measured - 1,
                "serial_ms_per_token": serial.timing.ms_per_token,
                "serial_error": serial.timing.ms_per_token / measured - 1,
            }
        row |= {"sim_hit_rate": staged.stats.hit_rate, "measured_hit_rate": r["store"]["hit_rate"]}
        rows.append(row)  # (the measured hit rate counts the prompt's requests too)
    return rows


def expert_share(g: dict, dense_bytes: int) -> float:
    """The routed experts' share of the bytes a decode token reads."""
    routed = g["n_moe_layers"] * g["top_k"] * g["expert_bytes"]
    return routed / (routed + dense_bytes)


def _replay(r: dict, g: dict, routes: list, warm: int, read_gbs: float, compute_ms: float, share: float):
    """One run's routing [T, L, K] through the simulator; the first `warm` tokens only fill the cache."""
    from moeflow.cache import CacheCapacity
    from moeflow.sim.simulator import SimConfig, simulate
    from moeflow.sim.trace import Trace, TraceMeta

    experts = np.asarray(routes, dtype=np.int16)
    T = len(experts)
    meta = TraceMeta(**{k: g[k] for k in TraceMeta.__dataclass_fields__ if k in g})
    trace = Trace(
        experts, np.ones(experts.shape, np.float32), np.zeros(T, np.int32), np.zeros(T, np.int32), meta
    )
    cfg = SimConfig(
        CacheCapacity(total=r["store"]["budget_bytes"] // g["expert_bytes"]),
        policy=r["store"]["policy"],
        bandwidth_gbs=read_gbs,
        compute_ms=compute_ms,
        expert_share=share,
        fit_fraction=(warm + 0.5) / T if warm else 0.0,  # (int() of it is exactly `warm`)
    )
    return simulate(trace, cfg)


def case_scale(a) -> dict:
    model = Path(a.model)
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model}: build it first (see BENCHMARKS.md for the make_checkpoint command)")
    g = expert_geometry(model)
    gguf = model / "gguf" / "model-bf16.gguf"
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, g["vocab"] - 100, a.prompt).tolist()
    base = {
        "model": str(model),
        "prompt": prompt,
        "tokens": a.tokens,
        "dtype": "bfloat16",
        "record": True,
        "temperature": 1.0,
    }
    K = g["top_k"]
    specs = [
        base | {"name": "naive (top-k, no prefetch)", "budget": K * g["expert_bytes"], "prefetch": "none"},
    ]
    for share in (0.10, 0.25, 0.50):
        b = budget_bytes(share, g)
        specs.append(base | {"name": f"{share:.0%} cyclic lookahead", "budget": b, "policy": "cyclic"})
        specs.append(
            base | {"name": f"{share:.0%} cyclic none", "budget": b, "policy": "cyclic", "prefetch": "none"}
        )
    specs += with_threads(specs, ("cyclic none",))
    specs.append(base | {"name": "all in RAM", "record": False})
    disk_before = disk_probe(model)
    results = run_configs(specs, a.rounds, a.only)
    if gguf.is_file():  # llama.cpp on the same weights, fed the tokens moeflow generated
        ram = next(r for r in results if r["name"] == "all in RAM")
        spec = {"name": "llama.cpp bf16 (mmap)", "engine": "llama.cpp", "gguf": str(gguf), "prompt": prompt}
        results.append(run_child(spec | {"feed": ram["tokens"]}))
        print(summarise(results[-1]) + f"  warm {results[-1]['warm_decode_tps']:.2f} tok/s", flush=True)
    disk_after = disk_probe(model)
    check_exact([r for r in results if not r["name"].startswith("llama")])
    return {
        "case": "scale",
        "model": str(model),
        "geometry": g,
        "disk": [disk_before, disk_after],
        "results": results,
    } | simulator_check(results, g)


def simulator_check(results: list[dict], g: dict) -> dict:
    """The simulator against the runs at two bandwidths: the naive run's demand-read rate, and the
    one that makes the staged model reproduce the naive run's time (its reads' latency and the
    store's work folded in). Nothing without an all-in-RAM and a naive run to calibrate it."""
    names = {r["name"]: r for r in results}
    naive, ram = names.get("naive (top-k, no prefetch)"), names.get("all in RAM")
    if ram is None or naive is None or not naive["store"]["demand_read_s"]:
        return {}
    rates = {"demand_rate": naive["store"]["demand_bytes"] / naive["store"]["demand_read_s"] / 1e9}
    # naive: every layer-step runs its non-expert part, loads its K experts one after another,
    # computing each as it lands, and computes the last after the last load
    L, K = g["n_moe_layers"], g["top_k"]
    compute, share = 1e3 / ram["decode_tps"] / L, expert_share(g, naive["dense_bytes"])
    load_ms = (1e3 / naive["decode_tps"] / L - compute * (1 - share) - compute * share / K) / K
    if load_ms > 0:
        rates["fitted_to_naive"] = g["expert_bytes"] / load_ms / 1e6
    return {"simulator_check": modelled_vs_measured(results, g, rates), "simulator_bandwidth_gbs": rates}


def expert_geometry(model: Path) -> dict:
    """A checkpoint's trace meta without loading its weights (config and headers only)."""
    from moeflow.loader.checkpoint import TENSOR_DTYPES, Checkpoint
    from moeflow.models.registry import parse_args

    ckpt = Checkpoint(model)
    args, _ = parse_args(ckpt.config)
    m = args.moe
    name = next(k for k in ckpt.keys() if ".experts." in k)
    dtype = TENSOR_DTYPES[ckpt.header[name]["dtype"]]
    return {
        "model": str(model),
        "model_type": args.model_type,
        "moe_layers": list(args.moe_layers),
        "n_moe_layers": len(args.moe_layers),
        "n_experts": m.n_experts,
        "top_k": m.top_k,
        "hidden": args.hidden,
        "expert_intermediate": m.intermediate,
        "expert_bytes": 3 * args.hidden * m.intermediate * dtype.itemsize,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab": args.vocab_size,
    }


def case_dense(a) -> dict:
    """Decode speed of the converted model against its dense source, both all in RAM (fp32)."""
    from moeflow.corpus import read_text
    from moeflow.default_model import default_model_path, smollm2_gguf
    from moeflow.loader.open import open_model
    from moeflow.tokenizer import encode

    models = [Path(m) for m in a.models] if a.models else [default_model_path(progress=True)]
    _, tok = open_model(models[0], progress=False)
    prompt = encode(tok, read_text("builtin:evaluation"))[5000 : 5000 + a.prompt]
    specs = [{"name": f"dense {smollm2_gguf().name}", "model": str(smollm2_gguf())}]
    specs += [{"name": m.name, "model": str(m)} for m in models]
    specs = [s | {"prompt": prompt, "tokens": a.tokens} for s in specs]
    return {"case": "dense", "results": run_configs(specs, a.rounds, a.only)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", nargs="?", choices=["real", "scale", "dense"])
    p.add_argument("--models", nargs="*", help="dense case: converted models (default: the built-in one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, default=48, help="tokens decoded per run")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="real case: compute dtype")
    p.add_argument("--only", nargs="*", help="run only configurations whose names start with these")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(child_llama(spec) if spec.get("engine") == "llama.cpp" else child(spec)))
        return
    result = {"real": case_real, "scale": case_scale, "dense": case_dense}[a.case](a)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
