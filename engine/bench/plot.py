"""``bench ops --plot``: the table as bars, one panel per op and dtype, one bar per backend per shape.

The bar is the fwd+bwd rate (TFLOP/s or GB/s: higher is better, comparable across shapes); rows that
failed or could not run have no bar. matplotlib is imported here only, when a plot is asked for.
"""
from __future__ import annotations

from pathlib import Path

from .tables import check_plot_support


def plot_ops(rows: list[dict], path: str | Path, title: str = "") -> None:
    check_plot_support()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        panels.setdefault((r["op"], r["dtype"]), []).append(r)
    # One colour per backend across all panels.
    palette = plt.get_cmap("tab10")
    colours = {b: palette(i % 10) for i, b in enumerate(dict.fromkeys(r["backend"] for r in rows))}
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(12, 3.2 * max(1, len(panels))), squeeze=False)
    for ax, ((op, dtype), panel) in zip(axes[:, 0], panels.items()):
        shapes = list(dict.fromkeys(r["shape"] for r in panel))
        backends = [b for b in dict.fromkeys(r["backend"] for r in panel)
                    if any(r["backend"] == b and r["fwdbwd_rate"] for r in panel)]
        width = 0.8 / max(1, len(backends))
        for i, backend in enumerate(backends):
            rates = {r["shape"]: r["fwdbwd_rate"] for r in panel if r["backend"] == backend and r["fwdbwd_rate"]}
            xs = [j + (i - (len(backends) - 1) / 2) * width for j, s in enumerate(shapes) if s in rates]
            ax.bar(xs, [rates[s] for s in shapes if s in rates], width, label=backend, color=colours[backend])
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"fwd+bwd {panel[0]['unit']}" if op != "optimizer" else f"step {panel[0]['unit']}")
        ax.set_title(f"{op} ({dtype})", fontsize=10)
        if backends:
            ax.legend(fontsize=8, ncol=min(6, len(backends)))
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98) if title else None)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
