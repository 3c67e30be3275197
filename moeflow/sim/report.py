"""Plain-text tables of simulation results, as `moeflow simulate` prints them."""

from __future__ import annotations

from .simulator import SimResult


def label(r: SimResult) -> str:
    return r.policy if r.predictor is None else f"{r.policy}+{r.predictor}"


def results_table(results: list[SimResult]) -> str:
    """One row per run: hits, traffic and modelled time."""
    header = [
        "policy",
        "capacity",
        "hit rate",
        "misses",
        "prefetched",
        "pf hits",
        "wasted",
        "moved",
        "ms/token",
    ]
    header += ["stall", "prec", "recall"]
    rows = []
    for r in results:
        s, p = r.stats, r.prediction
        rows.append(
            [
                label(r),
                _capacity(r),
                f"{s.hit_rate:.2%}",
                str(s.misses),
                str(s.prefetches),
                str(s.prefetch_hits),
            ]
            + [str(s.wasted_prefetches), f"{r.bytes_moved / 1e9:.2f} GB", f"{r.timing.ms_per_token:.2f}"]
            + [f"{r.timing.stall_ms / r.timing.total_ms:.0%}" if r.timing.total_ms else "-"]
            + ([f"{p.precision:.1%}", f"{p.recall:.1%}"] if p else ["-", "-"])
        )
    return _table(header, rows)


def sweep_table(results: list[SimResult]) -> str:
    """Hit rate per run (rows) and capacity (columns)."""
    sizes = sorted({r.capacity for r in results})
    by_run: dict[str, dict[int, float]] = {}
    for r in results:
        by_run.setdefault(label(r), {})[r.capacity] = r.hit_rate
    unit = "per layer" if results[0].scope == "layer" else "in all"
    header = [f"hit rate / capacity ({unit})", *map(str, sizes)]
    rows = [
        [name, *(f"{cells[c]:.1%}" if c in cells else "-" for c in sizes)] for name, cells in by_run.items()
    ]
    return _table(header, rows)


def _capacity(r: SimResult) -> str:
    return f"{r.capacity}/layer" if r.scope == "layer" else f"{r.capacity} total"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # names flush left, numbers flush right
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(line(row) for row in [header, *rows])
