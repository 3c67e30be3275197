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
        **extra,
    )


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K" if unit else "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
