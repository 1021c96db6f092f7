"""Where a run lives and what it resumes from: run directories, the checkpoint to resume, the recipe
changes a resumed run reports, and every RNG state a checkpoint keeps."""
from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..checkpoint import CheckpointError
from ..config import Recipe, RecipeError

_STAMP = re.compile(r"-\d{8}-\d{6}(-\d+)?$")


def _new_run_dir(name: str) -> Path:
    """``runs/<name>-<timestamp>``, with a counter if a run of that name started in the same second."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _latest_run_dir(name: str) -> Path | None:
    """The newest ``runs/<name>-<timestamp>`` holding a complete checkpoint, or None."""
    runs = [d for d in Path("runs").glob(f"{name}-*") if _STAMP.fullmatch(d.name[len(name):])
            and checkpoint.latest(d / "checkpoints") is not None]
    return max(runs, key=lambda d: checkpoint.latest(d / "checkpoints").stat().st_mtime, default=None)


def _checkpoint_in(where: Path) -> Path:
    """The checkpoint to resume from, given a checkpoint file, a run directory or its checkpoints folder."""
    found = checkpoint.find(where)
    if found is None:
        folder = where / "checkpoints" if (where / "checkpoints").is_dir() else where
        raise CheckpointError(f"no complete checkpoint to resume in {folder}")
    return found


def restarted_by_torchrun() -> bool:
    """torchrun started this process again after a worker failed (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def locate_run(recipe: Recipe) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None for a fresh run).

    Resuming writes into the resumed run's directory unless ``run.dir`` names another; a fresh run gets
    ``run.dir`` or a new ``runs/<name>-<timestamp>``, and refuses a directory that already holds
    checkpoints (it would mix two runs; resume it or choose another run.dir). When torchrun restarts a
    job after a worker failed, the job resumes from its latest checkpoint by itself.
    """
    r = recipe
    resume = r.checkpoint.resume
    if not resume and restarted_by_torchrun():
        previous = Path(r.run.dir) if r.run.dir else _latest_run_dir(r.run.name)
        if previous is not None and checkpoint.latest(previous / "checkpoints") is not None:
            return previous, checkpoint.latest(previous / "checkpoints")
    if not resume:
        run_dir = Path(r.run.dir) if r.run.dir else _new_run_dir(r.run.name)
        if checkpoint.list_checkpoints(run_dir / "checkpoints"):
            raise RecipeError(f"run.dir: {run_dir} already holds the checkpoints of a run; resume it "
                              f"(--resume / checkpoint.resume = 'latest') or choose another run.dir")
        return run_dir, None
    if resume == "latest":
        source = Path(r.run.dir) if r.run.dir else _latest_run_dir(r.run.name)
        if source is None:
            raise RecipeError(f"checkpoint.resume = 'latest': no run named {r.run.name!r} with a checkpoint under "
                              f"runs/; set run.dir to the run directory, or resume from a checkpoint path")
    else:
        source = Path(resume)
        if not source.exists():
            raise RecipeError(f"checkpoint.resume: no such checkpoint or run directory: {source}")
    ckpt = _checkpoint_in(source)
    if r.run.dir:
        return Path(r.run.dir), ckpt
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent, ckpt
    return _new_run_dir(r.run.name), ckpt


def rng_state(device: torch.device) -> dict:
    """Every RNG the run draws from, as tensors and plain values (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the RNG states :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """``section.key: old -> new`` for each field that differs (the run directory and resume excepted)."""
    changes = []
    for section, values in current.items():
        for key, value in values.items():
            if (section, key) in (("run", "dir"), ("checkpoint", "resume")) or key not in saved.get(section, {}):
                continue
            old = saved[section][key]
            if (list(old) if isinstance(old, (list, tuple)) else old) != \
                    (list(value) if isinstance(value, (list, tuple)) else value):
                changes.append(f"{section}.{key}: {old!r} -> {value!r}")
    return changes

