"""Multivariate time series: a built-in generated set, or the numeric columns of a CSV or parquet file.

``data.source = "series"`` is a deterministic set of 4 channels over 4000 steps (an hourly clock: a
daily season of 24 steps, a weekly one of 168), made to have something real to learn: seasons of
different shapes, slow trends, autocorrelated noise, and one channel that follows another with a lag.
A file source gives one row per time step; ``data.columns`` picks the channels ("" takes every column
whose values all parse as numbers, so a timestamp column is left out).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..config import DataConfig, RecipeError

SERIES_LENGTH = 4000
SERIES_SEASON = 24


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    """Autocorrelated noise: e[t] = phi·e[t-1] + sigma·N(0, 1)."""
    shocks = rng.normal(0.0, sigma, n)
    out = np.empty(n)
    out[0] = shocks[0]
    for i in range(1, n):
        out[i] = phi * out[i - 1] + shocks[i]
    return out


def generated_series() -> tuple[np.ndarray, list[str]]:
    """The built-in set: (SERIES_LENGTH, 4) float64 values and the channel names. Always the same."""
    rng = np.random.default_rng(2026)
    n = SERIES_LENGTH
    t = np.arange(n, dtype=np.float64)
    day, week = 2 * np.pi * t / SERIES_SEASON, 2 * np.pi * t / (7 * SERIES_SEASON)
    temperature = 10 + 0.001 * t + 5 * np.sin(day) + 2 * np.sin(week) + _ar1(rng, n, 0.8, 0.5)
    load = 50 + 10 * np.sin(day - 1) + 4 * np.sin(2 * day) + 6 * np.sin(week) + _ar1(rng, n, 0.5, 1.5)
    sales = (20 + 0.003 * t) * (1 + 0.3 * np.sin(day)) + rng.normal(0.0, 1.0, n)
    lagged = np.roll(temperature, 3)
    lagged[:3] = temperature[0]
    follower = 0.6 * lagged + 2 * np.cos(day) + _ar1(rng, n, 0.3, 0.5)
    return np.stack([temperature, load, sales, follower], axis=1), ["temperature", "load", "sales", "follower"]


def _read_table(path: Path) -> dict[str, list]:
    """Column name -> values, from a CSV file with a header row or a parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # imported only for parquet sources

        return pq.read_table(path).to_pydict()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise RecipeError(f"data.source: {path} is empty")
    header, body = rows[0], rows[1:]
    return {name: [row[i] if i < len(row) else "" for row in body] for i, name in enumerate(header)}


def _as_numbers(values: list) -> np.ndarray | None:
    try:
        return np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def load_series(cfg: DataConfig) -> tuple[np.ndarray, list[str]]:
    """(steps, channels) float64 values of the source, and the channel names."""
    if cfg.source == "series":
        values, names = generated_series()
        wanted = [c.strip() for c in cfg.columns.split(",") if c.strip()]
        for c in wanted:
            if c not in names:
                raise RecipeError(f"data.columns: no column {c!r} in the built-in series; columns: {', '.join(names)}")
        keep = [names.index(c) for c in wanted] if wanted else list(range(len(names)))
        return values[:, keep], [names[i] for i in keep]
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise RecipeError(f"data.source: no such file: {path}")
    table = _read_table(path)
    wanted = [c.strip() for c in cfg.columns.split(",") if c.strip()]
    columns = []
    for name in wanted or table:
        if name not in table:
            raise RecipeError(f"data.columns: no column {name!r} in {path}; columns: {', '.join(table)}")
        numbers = _as_numbers(table[name])
        if numbers is None and wanted:
            raise RecipeError(f"data.columns: column {name!r} of {path} holds values that are not numbers")
        if numbers is not None:
            if not np.isfinite(numbers).all():
                row = int(np.flatnonzero(~np.isfinite(numbers))[0])
                raise RecipeError(f"data.columns: column {name!r} of {path} has a missing or non-finite value "
                                  f"at row {row}")
            columns.append((name, numbers))
    if not columns:
        raise RecipeError(f"data.columns: {path} has no numeric column; columns: {', '.join(table)}")
    return np.stack([v for _, v in columns], axis=1), [n for n, _ in columns]
