"""Output of the benchmarks: table cells, the plain-text table, and the JSON and CSV files."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .args import BenchError


# ---------------------------------------------------------------------------------------------------
# Output: table, JSON, CSV
# ---------------------------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: '–' for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically (a reader, or a run killed mid-write, never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def write_csv(path: str | Path, columns: Sequence[str], records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: _csv_cell(record.get(k)) for k in columns})
    os.replace(tmp, path)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return value


def check_plot_support(option: str = "--plot") -> None:
    """Fail before any work if matplotlib, needed for ``option``, is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(f"{option} needs matplotlib: pip install matplotlib (or leave out {option})") from None


def write_results(result: dict, json_path: str | None, csv_path: str | None, columns: Sequence[str]) -> None:
    """Write a command's result as JSON and its rows as CSV, each where a path is given."""
    if json_path:
        write_json(json_path, result)
    if csv_path:
        write_csv(csv_path, columns, result["rows"])
