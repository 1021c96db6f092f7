"""``tritonforge plot``: the loss curves of one or several runs in a PNG.

    tritonforge plot RUN_DIR [RUN_DIR ...] [-o OUT.png] [--x steps|tokens]

Each run directory's ``metrics.jsonl`` gives the training loss (its train records) and the validation
loss (its eval records); ``recipe.toml`` and ``env.json`` give the run's name and kernel backends, which
label its curves, so that runs of two backends can be laid over each other. By default there are two
panels, loss against steps and loss against tokens (images for an image task); ``--x`` keeps one.

matplotlib is an optional dependency (``pip install 'tritonforge[plot]'``), imported only here.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .runlog import read_metrics

AXES = ("steps", "tokens")
_UNIT_NAMES = {"tok": "tokens", "img": "images"}


class PlotError(RuntimeError):
    """A run directory cannot be plotted, or matplotlib is missing."""


@dataclass
class Curves:
    """One run's losses: ``(step, items, loss)`` triples for training and validation."""

    label: str
    unit: str
    train: list[tuple[int, int, float]] = field(default_factory=list)
    val: list[tuple[int, int, float]] = field(default_factory=list)


def backends_label(backends: dict[str, str]) -> str:
    """"torch", "triton", or "triton: op, op" when only some ops run Triton kernels."""
    chosen = set(backends.values())
    if len(chosen) == 1:
        return chosen.pop()
    return "triton: " + ", ".join(op for op, b in backends.items() if b == "triton")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_run(run_dir: str | Path) -> Curves:
    """The loss curves of a run directory, labelled by its run name and kernel backends."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{run_dir} is not a run directory: it has no metrics.jsonl")
    try:
        name = tomllib.loads((run_dir / "recipe.toml").read_text())["run"]["name"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        name = run_dir.name
    env = _read_json(run_dir / "env.json")
    label = f"{name} ({backends_label(env['kernels'])})" if env.get("kernels") else name
    curves = Curves(label=label, unit=env.get("unit", ""))
    records = read_metrics(metrics)
    # Items per step, for eval records written without an item count.
    per_step = next((r["items"] / r["step"] for r in records if r.get("kind") == "train" and r.get("items")), 0)
    for r in records:
        kind, loss = r.get("kind"), r.get("loss" if r.get("kind") == "train" else "val_loss")
        if kind not in ("train", "eval") or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        point = (r["step"], r.get("items", round(r["step"] * per_step)), float(loss))
        (curves.train if kind == "train" else curves.val).append(point)
    if not curves.train and not curves.val:
        raise PlotError(f"{metrics} holds no finite train or validation loss to plot")
    return curves


def plot_runs(run_dirs: list[str | Path], out: str | Path, axes: tuple[str, ...] = AXES) -> Path:
    """Draw the runs' train (solid) and validation (dashed) losses against each of ``axes`` into ``out``."""
    runs = [load_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    for run, d in zip(runs, run_dirs):  # two runs with the same name and backends: tell them apart
        if labels.count(run.label) > 1:
            run.label += f" [{d}]"
    try:
        from matplotlib.figure import Figure  # optional; the object API needs no pyplot or display
    except ImportError:
        raise PlotError("tritonforge plot needs matplotlib: pip install 'tritonforge[plot]'") from None

    units = {r.unit for r in runs}
    items_name = _UNIT_NAMES.get(units.pop(), "items") if len(units) == 1 else "items"
    fig = Figure(figsize=(6.4 * len(axes), 4.4), dpi=100, layout="constrained")
    panels = fig.subplots(1, len(axes), squeeze=False)[0]
    for ax, x in zip(panels, axes):
        column = 0 if x == "steps" else 1
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            if run.train:
                ax.plot([p[column] for p in run.train], [p[2] for p in run.train], color=color, lw=1.2,
                        label=f"{run.label} train")
            if run.val:
                ax.plot([p[column] for p in run.val], [p[2] for p in run.val], color=color, lw=1.2, ls="--",
                        marker="o", ms=3, label=f"{run.label} val")
        ax.set_xlabel("step" if x == "steps" else items_name)
        ax.set_ylabel("loss")
        ax.set_title(f"loss against {'steps' if x == 'steps' else items_name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tritonforge plot", description="Draw the loss curves of training runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    parser.add_argument("-o", "--out", default="loss.png", help="the PNG to write (default: loss.png)")
    parser.add_argument("--x", choices=AXES, help="one panel against this axis (default: both)")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.runs, args.out, (args.x,) if args.x else AXES)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
