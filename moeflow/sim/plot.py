"""Hit rate against capacity for every policy, with Belady's MIN drawn as the bound."""

from __future__ import annotations

from pathlib import Path

from .report import label
from .simulator import SimResult


def plot_sweep(results: list[SimResult], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    runs: dict[str, list[SimResult]] = {}
    for r in results:
        runs.setdefault(label(r), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda r: r.capacity)
        bound = name.startswith("belady")
        style = (
            {"color": "black", "linestyle": "--", "label": f"{name} (bound)"} if bound else {"label": name}
        )
        ax.plot([r.capacity for r in rs], [100 * r.hit_rate for r in rs], marker="o", markersize=3, **style)
    unit = "experts per layer" if results[0].scope == "layer" else "experts in all layers"
    ax.set(xlabel=f"cache capacity ({unit})", ylabel="hit rate (%)", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)  # capacities are whole experts
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
