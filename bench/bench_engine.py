"""Batch-1 prefill/decode benchmark: moeflow vs transformers vs llama.cpp on one MoE checkpoint.

    python bench/make_checkpoint.py bench/.cache/qwen3moe-64e
    python bench/gguf_convert.py bench/.cache/qwen3moe-64e
    python bench/bench_engine.py --model bench/.cache/qwen3moe-64e --rounds 5 --json bench/out/run.json

Every variant is loaded once and kept in memory.  Each round probes memory bandwidth, then runs
every variant (order reversed on odd rounds so slow drift of the machine does not favour whoever
runs first): a ``--prompt-tokens`` prefill and ``--new-tokens`` greedy tokens with EOS ignored.
Medians over rounds are reported, together with the weight bytes each decoded token has to
stream from memory and the fraction of the probed bandwidth that represents: at batch 1 decode
is bandwidth bound, so that fraction is the engine's efficiency independent of machine drift.

``--engines`` takes engine names (all their variants) or ``engine:variant`` items, e.g.
``--engines transformers:bf16,llamacpp:q8_0``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script
from gguf_convert import gguf_path  # noqa: E402
from membw import probe_samples  # noqa: E402

ENGINE_VARIANTS: dict[str, tuple[str, ...]] = {
    "moeflow": ("fp32", "bf16"),
    "transformers": ("fp32", "bf16"),
    "llamacpp": ("f32", "f16", "q8_0"),
}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0}
# Reference variants for the ratio columns.
LLAMA_F32, LLAMA_F16 = "llama.cpp F32", "llama.cpp F16"
PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Memory bandwidth, not arithmetic, bounds the "
    "speed of generating one token at a time from a mixture-of-experts language model, because "
    "every step has to stream the attention weights and the selected experts from DRAM. "
)


# --------------------------------------------------------------------------------------------
# Weight bytes touched per decoded token
# --------------------------------------------------------------------------------------------


@dataclass
class WeightSplit:
    """Weight sizes of a checkpoint split by how a batch-1 decode step reads them."""

    always: float  # attention, norms, router, lm_head: read in full for every token
    experts: float  # all routed experts; a token reads top_k / n_experts of them
    embedding: float  # input embedding table; a token reads one row, so it is not counted

    def per_token(self, top_k: int, n_experts: int) -> float:
        return self.always + self.experts * top_k / n_experts


def _kind(name: str) -> str:
    # HF: "...mlp.experts.3.up_proj.weight" or packed "...mlp.experts.gate_up_proj";
    # GGUF: "blk.0.ffn_up_exps.weight".  Shared experts ("shared_expert", "_shexp") are
    # always-on, which these patterns already leave out.
    if ".experts." in name or "_exps." in name:
        return "experts"
    if "embed_tokens" in name or name.startswith("token_embd"):
        return "embedding"
    return "always"


def _split(sizes: dict[str, float], output_names: Sequence[str]) -> WeightSplit:
    totals = {"always": 0.0, "experts": 0.0, "embedding": 0.0}
    for name, nbytes in sizes.items():
        totals[_kind(name)] += nbytes
    if not any(n in sizes for n in output_names):
        # Tied embeddings: the lm_head matmul reads the whole table every token.
        totals["always"] += totals["embedding"]
    return WeightSplit(**totals)


def hf_weight_split(model_dir: Path, bytes_per_weight: float) -> WeightSplit:
    """Split from safetensors headers, priced at the variant's dtype (what the engine holds)."""
    from safetensors import safe_open

    sizes: dict[str, float] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                sizes[name] = float(np.prod(st.get_slice(name).get_shape())) * bytes_per_weight
    return _split(sizes, ("lm_head.weight",))


def gguf_weight_split(path: Path) -> WeightSplit:
    """Split from the GGUF's real tensor sizes (the converter keeps norms and router in F32)."""
    from gguf import GGUFReader

    sizes = {t.name: float(t.n_bytes) for t in GGUFReader(path).tensors}
    return _split(sizes, ("output.weight",))


def routing(model_dir: Path) -> tuple[int, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n_experts = next(cfg[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in cfg)
    return int(cfg["num_experts_per_tok"]), int(n_experts)


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    prefill_tokens: int
    prefill_s: float
    decode_tokens: int  # tokens produced after the first one (which prefill already yields)
    decode_s: float
    wall_s: float  # whole call, a cross-check on engine-reported numbers
    tokens: list[int] | None = None  # generated ids, where the engine exposes them
    extra: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    label: str

    def run(self, prompt: list[int], new_tokens: int) -> Timing: ...


class MoeflowRunner:
    def __init__(self, model_dir: Path, variant: str, threads: int) -> None:
        from moeflow import LLM, SamplingParams

        self.label = f"moeflow {variant}"
        self._params = SamplingParams
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[variant]
        self.llm = LLM(str(model_dir), dtype=dtype, device="cpu", threads=threads, progress=False)

    def run(self, prompt: list[int], new_tokens: int) -> Timing:
        params = self._params(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompt_token_ids=[prompt], sampling_params=params)
        wall = time.perf_counter() - t0
        st = outs[0].stats
        return Timing(st.prefill_tokens, st.prefill_s, st.decode_tokens, st.decode_s, wall, outs[0].token_ids)


class _Stamps:
    """generate() streamer that only records when each put() happens.

    put() is called once with the prompt before prefill, then once per generated token, so the
    gaps give prefill time and per-token decode time from a single generate() call.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersRunner:
    def __init__(self, model_dir: Path, variant: str, threads: int) -> None:
        from transformers import AutoModelForCausalLM

        self.label = f"transformers {variant}"
        # disable_mmap: otherwise weights that need no conversion stay backed by the file's page
        # cache, which other processes' memory pressure can evict mid-benchmark (decode then
        # reads from disk).  All engines hold their weights in anonymous memory instead.
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=TORCH_DTYPES[variant], disable_mmap=True
        ).eval()
        eos = self.model.generation_config.eos_token_id
        self.pad_id = (eos[0] if isinstance(eos, list) else eos) or 0

    def run(self, prompt: list[int], new_tokens: int) -> Timing:
        ids = torch.tensor([prompt])
        stamps = _Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # suppresses EOS until the budget is spent
                do_sample=False,
                pad_token_id=self.pad_id,
                streamer=stamps,
            )
        wall = time.perf_counter() - t0
        t = stamps.times
        if len(t) != new_tokens + 1:
            raise RuntimeError(f"{self.label}: expected {new_tokens + 1} streamer calls, got {len(t)}")
        return Timing(
            len(prompt), t[1] - t[0], len(t) - 2, t[-1] - t[1], wall, out[0, len(prompt) :].tolist()
        )


class LlamaCppRunner:
    def __init__(self, gguf_file: Path, variant: str, threads: int, mmap: bool = False) -> None:
        import llama_cpp

        self.label = f"llama.cpp {variant.upper()}"
        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_file),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=512,
            n_batch=512,
            use_mmap=mmap,  # default resident weights, same reason as TransformersRunner
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def _greedy(self) -> int:
        # Llama.eval() no longer copies logits out (only for logits_all), so read the last row
        # straight from the context; argmax over 32k floats costs microseconds.
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def run(self, prompt: list[int], new_tokens: int) -> Timing:
        llm, lib = self.llm, self._lib
        llm.reset()  # next eval() drops the KV cache beyond position 0
        lib.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        llm.eval(prompt)
        tokens = [self._greedy()]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tokens[-1]])
            tokens.append(self._greedy())
        t2 = time.perf_counter()
        perf = lib.llama_perf_context(llm.ctx)
        own = {
            "t_p_eval_ms": perf.t_p_eval_ms,
            "n_p_eval": perf.n_p_eval,
            "t_eval_ms": perf.t_eval_ms,
            "n_eval": perf.n_eval,
        }
        return Timing(len(prompt), t1 - t0, new_tokens - 1, t2 - t1, t2 - t0, tokens, {"llama_perf": own})


@dataclass
class Variant:
    engine: str
    name: str
    runner: Runner
    bytes_per_token: float
    load_s: float


def parse_engines(spec: str) -> list[tuple[str, str]]:
    chosen: list[tuple[str, str]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        engine, _, variant = item.partition(":")
        if engine not in ENGINE_VARIANTS:
            raise SystemExit(f"unknown engine {engine!r}; choose from {sorted(ENGINE_VARIANTS)}")
        variants = [variant] if variant else list(ENGINE_VARIANTS[engine])
        for v in variants:
            if v not in ENGINE_VARIANTS[engine]:
                raise SystemExit(f"{engine} has no variant {v!r}; choose from {ENGINE_VARIANTS[engine]}")
            chosen.append((engine, v))
    return chosen


def load_variant(engine: str, variant: str, model_dir: Path, threads: int) -> Variant:
    top_k, n_experts = routing(model_dir)
    t0 = time.perf_counter()
    if engine == "llamacpp":
        path = gguf_path(model_dir, variant)
        if not path.exists():
            raise SystemExit(f"{path} missing; run: python bench/gguf_convert.py {model_dir}")
        runner: Runner = LlamaCppRunner(path, variant, threads)
        split = gguf_weight_split(path)
    else:
        if engine == "moeflow":
            try:
                runner = MoeflowRunner(model_dir, variant, threads)
            except ImportError as e:
                raise SystemExit(f"moeflow.LLM unavailable ({e}); use --engines transformers,llamacpp") from e
        else:
            runner = TransformersRunner(model_dir, variant, threads)
        split = hf_weight_split(model_dir, BYTES_PER_WEIGHT[variant])
    load_s = time.perf_counter() - t0
    print(f"loaded {runner.label} in {load_s:.1f}s", flush=True)
    return Variant(engine, variant, runner, split.per_token(top_k, n_experts), load_s)


# --------------------------------------------------------------------------------------------
# Benchmark loop and report
# --------------------------------------------------------------------------------------------


def make_prompt(model_dir: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT_TEXT * 8)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"prompt text gives only {len(ids)} tokens; need {n}")
    return ids[:n]


def sample_record(v: Variant, t: Timing, bw_gbps: float) -> dict[str, Any]:
    decode_tps = t.decode_tokens / t.decode_s
    achieved = v.bytes_per_token * decode_tps / 1e9
    rec = asdict(t)
    rec.update(
        label=v.runner.label,
        prefill_ms=t.prefill_s * 1e3,
        prefill_tps=t.prefill_tokens / t.prefill_s,
        decode_tps=decode_tps,
        achieved_gbps=achieved,
        bw_fraction=achieved / bw_gbps,
    )
    return rec


def run_rounds(variants: list[Variant], prompt: list[int], args: argparse.Namespace) -> list[dict]:
    rounds = []
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        bw = probe_samples(args.probe_seconds, threads=args.threads)
        bw_best = max(bw)
        samples = []
        for v in order:
            rec = sample_record(v, v.runner.run(prompt, args.new_tokens), bw_best)
            samples.append(rec)
            print(
                f"round {r}  {rec['label']:18s} prefill {rec['prefill_ms']:7.1f} ms  "
                f"decode {rec['decode_tps']:6.1f} tok/s  {rec['bw_fraction']:5.1%} of {bw_best:.1f} GB/s",
                flush=True,
            )
        rounds.append(
            {"round": r, "bandwidth_gbps": bw_best, "bandwidth_samples_gbps": bw, "samples": samples}
        )
    return rounds


def _median(values: list[float]) -> float | None:
    # None rather than NaN so the JSON report stays standard JSON.
    return statistics.median(values) if values else None


def _ratio(rounds: list[dict], label: str, ref: str, key: str) -> float | None:
    """Median over rounds of label/ref measured in the same round (cancels machine drift)."""
    if ref == label:
        return None
    ratios = []
    for rd in rounds:
        by = {s["label"]: s for s in rd["samples"]}
        if label in by and ref in by:
            ratios.append(by[label][key] / by[ref][key])
    return _median(ratios)


def _hf_reference(bytes_per_weight: float) -> str:
    # Compare with transformers at the same weight width: 4-byte variants against fp32, the
    # 16-bit and 8-bit ones against bf16.
    return "transformers fp32" if bytes_per_weight >= 4 else "transformers bf16"


def summarize(variants: list[Variant], rounds: list[dict]) -> list[dict]:
    rows = []
    for v in variants:
        label = v.runner.label
        mine = [s for rd in rounds for s in rd["samples"] if s["label"] == label]
        width = 4.0 if v.name in ("fp32", "f32") else 2.0
        hf_ref = _hf_reference(width)
        row: dict[str, Any] = {
            "label": label,
            "engine": v.engine,
            "variant": v.name,
            "gb_per_token": v.bytes_per_token / 1e9,
            "load_s": v.load_s,
        }
        for key in ("prefill_ms", "prefill_tps", "decode_tps", "achieved_gbps", "bw_fraction"):
            row[key] = _median([s[key] for s in mine])
        for key in ("decode_tps", "prefill_tps"):
            row[f"{key}_vs_llama_f32"] = _ratio(rounds, label, LLAMA_F32, key)
            row[f"{key}_vs_llama_f16"] = _ratio(rounds, label, LLAMA_F16, key)
            row[f"{key}_vs_transformers"] = _ratio(rounds, label, hf_ref, key)
        row["transformers_reference"] = hf_ref
        rows.append(row)
    return rows


def _fmt(x: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "–" if x is None else format(x * scale, spec) + suffix


COLUMNS = (
    "variant",
    "prefill ms",
    "prefill tok/s",
    "decode tok/s",
    "GB/token",
    "GB/s",
    "% of probe",
    "decode ×llama F32",
    "×llama F16",
    "×transformers",
    "prefill ×llama F32",
    "×llama F16",
    "×transformers",
)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            r["label"],
            _fmt(r["prefill_ms"], ".1f"),
            _fmt(r["prefill_tps"], ".0f"),
            _fmt(r["decode_tps"], ".1f"),
            _fmt(r["gb_per_token"], ".3f"),
            _fmt(r["achieved_gbps"], ".1f"),
            _fmt(r["bw_fraction"], ".0f", 100, "%"),
            *(_fmt(r[f"decode_tps_vs_{k}"], ".2f") for k in ("llama_f32", "llama_f16", "transformers")),
            *(_fmt(r[f"prefill_tps_vs_{k}"], ".2f") for k in ("llama_f32", "llama_f16", "transformers")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outliers(rounds: list[dict], factor: float = 0.6) -> list[str]:
    """Samples decoding below ``factor`` × their variant's median: another process got the CPU
    or the memory bus (2 shared vCPUs), so the median over more rounds is the number to trust."""
    by_label: dict[str, list[tuple[int, float]]] = {}
    for rd in rounds:
        for s in rd["samples"]:
            by_label.setdefault(s["label"], []).append((rd["round"], s["decode_tps"]))
    found = []
    for label, vals in by_label.items():
        med = statistics.median(v for _, v in vals)
        found += [
            f"{label} round {r} decoded {v:.1f} tok/s (median {med:.1f})" for r, v in vals if v < factor * med
        ]
    return found


def warn_if_low_memory(min_free_gib: float = 2.0) -> None:
    # No swap here: once everything is loaded, a co-running job that needs more than what is
    # left gets OOM-killed (or kills us); say so up front rather than after a confusing crash.
    meminfo = dict(ln.split(":", 1) for ln in Path("/proc/meminfo").read_text().splitlines())
    avail_gib = int(meminfo["MemAvailable"].split()[0]) / 2**20
    if avail_gib < min_free_gib:
        print(f"warning: only {avail_gib:.1f} GiB of memory left after loading all variants")


def greedy_agreement(rounds: list[dict], ref: str = "transformers fp32") -> dict[str, int]:
    """Leading tokens each variant shares with ``ref`` in round 0: a cheap check that all
    engines run the same model (random weights make near-ties, so low-precision ones diverge)."""
    by = {s["label"]: s.get("tokens") for s in rounds[0]["samples"]} if rounds else {}
    base = by.get(ref)
    out = {}
    for label, toks in by.items():
        if base and toks and label != ref:
            out[label] = next(
                (i for i, (a, b) in enumerate(zip(base, toks, strict=False)) if a != b),
                min(len(base), len(toks)),
            )
    return out


def environment(args: argparse.Namespace) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    return {
        "cpu": cpu,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: version(p) for p in ("torch", "transformers", "llama-cpp-python", "moeflow")},
        "git_commit": commit,
        "args": {k: str(v) for k, v in vars(args).items()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="HF checkpoint dir (GGUFs in DIR/gguf/)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default="moeflow,transformers,llamacpp")
    p.add_argument("--probe-seconds", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=None, help="write raw samples and summary here")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the first token comes from prefill)")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load weight bars would drown the per-round lines
    prompt = make_prompt(args.model, args.prompt_tokens)
    variants = [load_variant(e, v, args.model, args.threads) for e, v in parse_engines(args.engines)]

    warn_if_low_memory()
    # One untimed pass per variant: pays one-time set-up costs (allocations, thread pools).
    for v in variants:
        v.runner.run(prompt, min(8, args.new_tokens))

    rounds = run_rounds(variants, prompt, args)
    rows = summarize(variants, rounds)
    bws = [rd["bandwidth_gbps"] for rd in rounds]
    print(
        f"\nprobed bandwidth: median {_median(bws):.1f} GB/s (range {min(bws):.1f}–{max(bws):.1f}) "
        f"over {len(bws)} rounds; {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
        f"{args.threads} threads\n"
    )
    print(markdown_table(rows))
    for s in outliers(rounds):
        print(f"warning: {s} — machine was busy; prefer more --rounds")
    agreement = greedy_agreement(rounds)
    if agreement:
        print("\nleading greedy tokens equal to transformers fp32:", agreement)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "environment": environment(args),
            "prompt_token_ids": prompt,
            "variants": [
                {
                    "label": v.runner.label,
                    "engine": v.engine,
                    "variant": v.name,
                    "bytes_per_token": v.bytes_per_token,
                    "load_s": v.load_s,
                }
                for v in variants
            ],
            "rounds": rounds,
            "summary": rows,
            "greedy_agreement": agreement,
        }
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
