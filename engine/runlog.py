"""Run logging: the console progress line, ``metrics.jsonl`` and Weights & Biases.

Every logged record goes to all three under the same metric names: a record is a flat dict with
``kind`` ("train" or "eval") and ``step``; ``metrics.jsonl`` holds it as one JSON line, wandb gets the
other keys at that step. On a terminal the progress line is redrawn in place; when output goes to a file
or pipe, each update is a plain line with no control characters. Only the main process of a distributed
run writes anything.

The logger exists from the start of a run so that setup can print, but writes nothing to disk until
:meth:`RunLogger.open`, which the trainer calls once the recipe has been checked and the task built.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .errors import RecipeError


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line cut short by a kill is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


class RunLogger:
    """Writes records to the console, ``<run_dir>/metrics.jsonl`` and (optionally) wandb."""

    def __init__(self, stream=None, enabled: bool = True, wandb_mode: str = "off"):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and self.stream.isatty()
        self.wandb_mode = wandb_mode
        self.wandb_id: str | None = None
        self._pending_live = False
        self._file = None
        self._wandb = None
        if enabled and wandb_mode != "off":
            try:
                import wandb  # noqa: F401  (checked now so a missing package stops the run before any work)
            except ImportError:
                raise RecipeError(f"logging.wandb = {wandb_mode!r} needs the wandb package: pip install wandb "
                                  f"(or set logging.wandb = 'off')") from None

    def open(self, run_dir: Path, resume_step: int | None = None, *, project: str = "tritonforge",
             name: str = "run", config: dict | None = None, wandb_id: str | None = None) -> None:
        """Start writing into ``run_dir``.

        A fresh run (``resume_step`` None) starts ``metrics.jsonl`` empty; a resumed one keeps the records
        up to ``resume_step`` and drops later ones, which belong to the stretch of the run after its last
        checkpoint that the resume repeats. ``wandb_id`` continues that wandb run.
        """
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and path.is_file():
            kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)
        if self.wandb_mode != "off":
            self._start_wandb(run_dir, project, name, config, wandb_id)

    def _start_wandb(self, run_dir: Path, project: str, name: str, config: dict | None, run_id: str | None) -> None:
        import wandb

        try:
            self._wandb = wandb.init(project=project, name=name, mode=self.wandb_mode, config=config,
                                     dir=str(run_dir), id=run_id, resume="allow" if run_id else None, reinit=True)
        except Exception as e:  # wandb raises many kinds (no API key, no network, bad project, ...)
            hint = ""
            if self.wandb_mode == "online":
                hint = " Log in with `wandb login`, or set logging.wandb = 'offline'."
            raise RecipeError(f"logging.wandb = {self.wandb_mode!r}: wandb could not start "
                              f"({type(e).__name__}: {e}).{hint}") from None
        self.wandb_id = self._wandb.id

    def print(self, text: str) -> None:
        """A permanent line (clears a live progress line first)."""
        if not self.enabled:
            return
        if self._pending_live:
            self.stream.write("\r\033[2K")
            self._pending_live = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def record(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and wandb (same names)."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "kind")}, step=record["step"])

    def progress(self, record: dict[str, Any], total_steps: int | None, unit: str, eta_s: float | None,
                 budget_left_s: float | None = None) -> None:
        """The progress line for a train record. While a time budget has not fixed the step count yet
        (``total_steps`` and ``eta_s`` None), the line shows the time left of the budget instead."""
        if not self.enabled:
            return
        step = f"step {record['step']}" if total_steps is None else f"step {record['step']}/{total_steps}"
        parts = [step, f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        if "grad_norm" in record:
            parts.append(f"gnorm {record['grad_norm']:.2f}")
        parts.append(f"{_si(record['throughput'])} {unit}/s")
        if "tflops" in record:
            parts.append(f"{record['tflops']:.1f} TFLOP/s")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if eta_s is not None:
            parts.append(f"ETA {format_duration(eta_s)}")
        if budget_left_s is not None:
            parts.append(f"budget left {format_duration(max(budget_left_s, 0.0))} (step count not fixed yet)")
        line = " | ".join(parts)
        if self.live:
            self.stream.write("\r\033[2K" + line)
            self._pending_live = True
            self.stream.flush()
        else:
            self.print(line)

    def eval_line(self, record: dict[str, Any]) -> None:
        """The line printed at each evaluation."""
        metrics = {k: v for k, v in record.items() if k not in ("kind", "step", "items")}
        self.print(f"eval @ step {record['step']}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def close(self, exit_code: int = 0) -> None:
        if self._pending_live:
            self.stream.write("\n")
            self._pending_live = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None


def environment(device, backends: dict[str, str], **extra: Any) -> dict[str, Any]:
    """What a run ran on: versions, device, kernel backends, the command line (plus ``extra``)."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "host": platform.node(),
        "torch": torch.__version__, "numpy": numpy.__version__, "tritonforge": _own_version(),
        "device": str(device), "kernels": backends, "threads": torch.get_num_threads(),
        "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _own_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("tritonforge")
    except metadata.PackageNotFoundError:  # run from a plain checkout
        return None


#: Dense bf16 tensor-core peaks (FLOP/s) used for MFU, by substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None
