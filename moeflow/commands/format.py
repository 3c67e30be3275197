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
        **extra,
    )


def add_store_args(p) -> None:
    p.add_argument(
        "--expert-memory",
        default=None,
        help="RAM budget for experts, e.g. 2GiB or 25%% (default: all resident)",
    )
    p.add_argument(
        "--expert-policy", default="cyclic", help="expert cache policy: cyclic, lru, lfu, reuse, pinned"
    )
    p.add_argument(
        "--expert-scope", default="global", help="budget shared by all layers (global) or per layer"
    )
    p.add_argument(
        "--prefetch",
        default="none",
        help="prefetch predictor: lookahead (next layer's router), frequency, cooccurrence (learned "
        "from --expert-trace), none (default)",
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
