import sys


def llm_from_args(a, **extra):
    """The LLM the model flags of any subcommand describe."""
    from ..llm import LLM

    return LLM(
        a.model,
        dtype=a.dtype,
        device=a.device,
        threads=a.threads,
        max_model_len=a.max_model_len,
        progress=sys.stderr.isatty(),
        expert_memory=a.expert_memory,
        expert_policy=a.expert_policy,
        expert_scope=a.expert_scope,
        prefetch=a.prefetch,
        expert_trace=a.expert_trace,
        host_memory=a.host_memory,
        on_miss=a.on_miss,
        expert_io=a.expert_io,
        expert_io_threads=a.io_threads,
        **extra,
    )


def add_store_args(p) -> None:
    p.add_argument(
        "--expert-memory",
        default=None,
        help="memory budget for experts, e.g. 2GiB or 25%% (default: all resident): RAM's on cpu, "
        "the accelerator's with --device cuda",
    )
    p.add_argument(
        "--host-memory",
        default=None,
        help="with --device cuda and --expert-memory: RAM budget of the host tier under the GPU's "
        "expert cache (default: every expert in pinned RAM); beyond it experts are read from disk",
    )
    p.add_argument(
        "--on-miss",
        default="copy",
        help="with --device cuda: copy a missed expert to the GPU and wait (copy, default), or compute "
        "it on the CPU where it lives while the copy runs (cpu)",
    )
    p.add_argument(
        "--expert-policy", default="cyclic", help="expert cache policy: cyclic, lru, lfu, reuse, pinned"
    )
    p.add_argument(
        "--expert-scope", default="global", help="budget shared by all layers (global) or per layer"
    )
    p.add_argument(
        "--prefetch",
        default="auto",
        help="prefetch predictor: lookahead (next layer's router), learned (a look-ahead fitted by "
        "`moeflow trace`, from --expert-trace), frequency, cooccurrence (from --expert-trace), "
        "none, auto (default: learned when --expert-trace has its fitted maps, else none)",
    )
    p.add_argument(
        "--expert-io",
        default="auto",
        help="how expert reads reach the disk: aio (Linux native AIO, no reader threads), threads "
        "(a pool of reader threads), auto (default: aio where the files take O_DIRECT)",
    )
    p.add_argument(
        "--io-threads",
        type=int,
        default=4,
        help="with --expert-io threads: reader threads (1: one expert read at a time; default 4)",
    )
    p.add_argument(
        "--expert-trace",
        default=None,
        help="routing trace of this model (moeflow trace): the pinned policy's hot set, cooccurrence's fit",
    )


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K" if unit else "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
