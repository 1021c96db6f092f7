"""Run logging: the console progress line, ``metrics.jsonl`` and Weights & Biases.

Every logged record goes to all three under the same metric names. On a terminal the progress line is
redrawn in place; when output goes to a file or pipe, each update is a plain line with no control
characters. Only the main process of a distributed run writes anything.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any


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


class RunLogger:
    """Writes records to the console, ``<run_dir>/metrics.jsonl`` and (optionally) wandb."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, wandb_mode: str = "off",
                 wandb_project: str = "tritonforge", run_name: str = "run", config: dict | None = None,
                 stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and self.stream.isatty()
        self._pending_live = False
        self._file = None
        self._wandb = None
        if not enabled:
            return
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_mode != "off":
            try:
                import wandb  # only imported when asked for
            except ImportError:
                raise RuntimeError(f"logging.wandb = {wandb_mode!r} needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode, config=config,
                                     dir=str(run_dir) if run_dir is not None else None, reinit=True)

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

    def progress(self, record: dict[str, Any], total_steps: int, unit: str, eta_s: float) -> None:
        """The progress line for a train record."""
        if not self.enabled:
            return
        parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        if "grad_norm" in record:
            parts.append(f"gnorm {record['grad_norm']:.2f}")
        parts.append(f"{_si(record['throughput'])} {unit}/s")
        if "tflops" in record:
            parts.append(f"{record['tflops']:.1f} TFLOP/s")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        parts.append(f"ETA {format_duration(eta_s)}")
        line = " | ".join(parts)
        if self.live:
            self.stream.write("\r\033[2K" + line)
            self._pending_live = True
            self.stream.flush()
        else:
            self.print(line)

    def close(self) -> None:
        if self._pending_live:
            self.stream.write("\n")
            self._pending_live = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def environment(device, backends: dict[str, str]) -> dict[str, Any]:
    """What a run ran on: versions, device, kernel backends."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "device": str(device), "kernels": backends, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
