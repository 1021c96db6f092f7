"""Checkpoints that survive a kill at any moment.

Each checkpoint is ``ckpt-<step>.pt`` (written with ``torch.save``) plus ``ckpt-<step>.json``, a manifest
holding the step, the byte size and the SHA-256 of the ``.pt`` file. Both are written to a temporary file,
flushed to disk with fsync, then renamed into place (the manifest last), and the folder is fsynced: a
checkpoint without its manifest is incomplete and ignored, so a kill leaves the previous checkpoint intact
and loadable. Loading re-checks size and hash first, so a truncated or corrupted file is refused with a
clear message instead of an unpickling traceback, and then unpickles with ``weights_only=True``: a
checkpoint holds tensors and plain Python values only, so loading one never runs code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

_MANIFEST = re.compile(r"^ckpt-(\d+)\.json$")
_DATA = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def step_of(path: str | Path) -> int:
    """The step a checkpoint file (``.pt`` or manifest) was saved at."""
    m = re.match(r"^ckpt-(\d+)\.(pt|json)$", Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint file (expected ckpt-<step>.pt)")
    return int(m.group(1))


def save(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step``, then prune the folder.

    Pruning keeps the newest ``keep`` checkpoints and removes any of a later step than ``step``: those
    belong to a run that was resumed from an earlier point, and are no longer its future. Leftovers of a
    write that was killed (temporary files, a ``.pt`` without its manifest) are removed too.
    """
    assert keep >= 1, keep
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pt = folder / f"ckpt-{step:08d}.pt"
    _atomic_write(pt, lambda f: torch.save(state, f))
    manifest = {"step": step, "file": pt.name, "bytes": pt.stat().st_size, "sha256": _sha256(pt)}
    _atomic_write(pt.with_suffix(".json"), lambda f: f.write(json.dumps(manifest).encode()))
    _prune(folder, step, keep)
    return pt


def _prune(folder: Path, current: int, keep: int) -> None:
    manifests = list_checkpoints(folder)
    stale = [m for m in manifests if step_of(m) > current]
    kept = [m for m in manifests if step_of(m) <= current]
    for manifest in stale + kept[:-keep]:
        manifest.unlink(missing_ok=True)  # the manifest first: a half-removed checkpoint reads as incomplete
        manifest.with_suffix(".pt").unlink(missing_ok=True)
    for name in os.listdir(folder):
        orphan = _DATA.match(name) and not (folder / name).with_suffix(".json").exists()
        if orphan or (name.startswith(".ckpt-") and name.endswith(".tmp")):
            (folder / name).unlink(missing_ok=True)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Manifests of complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := _MANIFEST.match(name))]
    return [p for _, p in sorted(found)]


def latest(folder: str | Path) -> Path | None:
    """The newest complete checkpoint (its ``.pt`` path), or None."""
    manifests = list_checkpoints(folder)
    return manifests[-1].with_suffix(".pt") if manifests else None


def _others(path: Path) -> str:
    others = [m.with_suffix(".pt").name for m in list_checkpoints(path.parent) if m.with_suffix(".pt") != path]
    return f"; other checkpoints in {path.parent}: {', '.join(others)}" if others else ""


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify the checkpoint against its manifest, then load it."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {path}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest_path = path.with_suffix(".json")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest {manifest_path.name}: it is incomplete "
                              f"(the run was probably killed while writing it){_others(path)}")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_bytes, expected_sha = int(manifest["bytes"]), str(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {e}") from None
    size = path.stat().st_size
    if size != expected_bytes:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {size} bytes, expected "
                              f"{expected_bytes}{_others(path)}")
    if _sha256(path) != expected_sha:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match the manifest{_others(path)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a file that hashes right but will not load: report, never a raw traceback
        raise CheckpointError(f"checkpoint {path} could not be loaded: {type(e).__name__}: {e}") from None
