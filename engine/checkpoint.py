"""Checkpoints that survive a kill at any moment, sharded across processes.

A checkpoint of step N is three things in the checkpoint folder:

- ``ckpt-N.pt``: the small, replicated state (step, RNG states, loss scaler, recipe, ...) written by the
  main process with ``torch.save``;
- ``ckpt-N.dcp/``: the model and optimizer state written through ``torch.distributed.checkpoint`` (DCP):
  every process writes its own shard, and a later run can load it at any world size (DCP reshards);
- ``ckpt-N.json``: the manifest, holding the step and the byte size and SHA-256 of every file above.

Each part is written under a temporary name, flushed with fsync and renamed into place, the manifest
last: a checkpoint without its manifest is incomplete and ignored, so a kill leaves the previous checkpoint
intact and loadable. Loading re-checks every size and hash first, so a truncated or corrupted file is
refused with a clear message instead of a traceback, and unpickles with ``weights_only=True``: a checkpoint
holds tensors and plain Python values only, so loading one never runs code.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_MANIFEST = re.compile(r"^ckpt-(\d+)\.json$")
_DATA = re.compile(r"^ckpt-(\d+)\.pt$")
_SHARDS = re.compile(r"^ckpt-(\d+)\.dcp$")


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _broadcast(value: Any) -> Any:
    """The main process's ``value`` on every process (an exception is re-raised everywhere)."""
    if not _distributed():
        if isinstance(value, BaseException):
            raise value
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def save(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2,
         sharded: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``step``, then prune the folder; returns the ``.pt`` path.

    ``state`` is written by the main process. ``sharded`` (model and optimizer state dicts, possibly of
    DTensors) is written through DCP by every process: in a distributed run every process must call this.
    Pruning keeps the newest ``keep`` checkpoints and removes any of a later step than ``step``: those
    belong to a run that was resumed from an earlier point, and are no longer its future. Leftovers of a
    write that was killed (temporary files and folders, parts without a manifest) are removed too.
    """
    assert keep >= 1, keep
    folder = Path(folder)
    pt = folder / f"ckpt-{step:08d}.pt"
    shards = pt.with_suffix(".dcp")
    tmp_shards = folder / f".{shards.name}.tmp"
    error = None
    if _is_main():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if tmp_shards.exists():
                shutil.rmtree(tmp_shards)
        except OSError as e:
            error = e
    _broadcast(error)
    if sharded is not None:
        import torch.distributed.checkpoint as dcp

        with _single_process_quiet():
            dcp.save(sharded, checkpoint_id=str(tmp_shards))  # collective; each process writes its shard
    error = None
    if _is_main():
        try:
            _atomic_write(pt, lambda f: torch.save(state, f))
            files = [pt]
            if sharded is not None:
                _fsync_tree(tmp_shards)
                if shards.exists():
                    shutil.rmtree(shards)
                os.replace(tmp_shards, shards)
                _fsync_dir(folder)
                files += sorted(p for p in shards.rglob("*") if p.is_file())
            manifest = {"step": step, "files": {str(f.relative_to(folder)): {"bytes": f.stat().st_size,
                                                                             "sha256": _sha256(f)}
                                                for f in files}}
            _atomic_write(pt.with_suffix(".json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            _prune(folder, step, keep)
        except OSError as e:
            error = e
    _broadcast(error)
    return pt


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _prune(folder: Path, current: int, keep: int) -> None:
    manifests = list_checkpoints(folder)
    stale = [m for m in manifests if step_of(m) > current]
    kept = [m for m in manifests if step_of(m) <= current]
    for manifest in stale + kept[:-keep]:
        manifest.unlink(missing_ok=True)  # the manifest first: a half-removed checkpoint reads as incomplete
        manifest.with_suffix(".pt").unlink(missing_ok=True)
        shutil.rmtree(manifest.with_suffix(".dcp"), ignore_errors=True)
    for name in os.listdir(folder):
        path = folder / name
        orphan = (_DATA.match(name) or _SHARDS.match(name)) and not path.with_suffix(".json").exists()
        if orphan or (name.startswith(".ckpt-") and name.endswith(".tmp")):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


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


def find(path: str | Path) -> Path | None:
    """The checkpoint ``path`` names: ``path`` itself when it is a file, else the newest complete checkpoint
    in the run directory ``path`` (its ``checkpoints`` folder) or in the folder ``path``; None if none."""
    path = Path(path)
    if path.is_file():
        return path
    return latest(path / "checkpoints" if (path / "checkpoints").is_dir() else path)


def _others(path: Path) -> str:
    others = [m.with_suffix(".pt").name for m in list_checkpoints(path.parent) if m.with_suffix(".pt") != path]
    return f"; other checkpoints in {path.parent}: {', '.join(others)}" if others else ""


def _verify(path: Path) -> None:
    """Check every part of the checkpoint against its manifest."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest_path = path.with_suffix(".json")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest {manifest_path.name}: it is incomplete "
                              f"(the run was probably killed while writing it){_others(path)}")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        expected = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is unreadable: {e!r}") from None
    for name, (expected_bytes, expected_sha) in expected.items():
        part = path.parent / name
        if not part.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {part} is missing{_others(path)}")
        size = part.stat().st_size
        if size != expected_bytes:
            raise CheckpointError(f"checkpoint {part} is truncated or corrupt: {size} bytes, expected "
                                  f"{expected_bytes}{_others(path)}")
        if _sha256(part) != expected_sha:
            raise CheckpointError(f"checkpoint {part} is corrupt: its SHA-256 does not match the "
                                  f"manifest{_others(path)}")


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir() and not path.name.endswith(".dcp"):
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no complete checkpoint in {path}")
        path = found
    return path


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify the whole checkpoint against its manifest (main process), then load its ``.pt`` state.

    In a distributed run every process must call this; a failed check is raised on every process.
    """
    path = _resolve(path)
    error = None
    if _is_main():
        try:
            _verify(path)
        except CheckpointError as e:
            error = e
    _broadcast(error)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a file that hashes right but will not load: report, never a raw traceback
        raise CheckpointError(f"checkpoint {path} could not be loaded: {type(e).__name__}: {e}") from None


def load_sharded(path: str | Path, template: dict[str, Any]) -> None:
    """Fill ``template`` (state dicts shaped for this run, any world size) from the checkpoint's shards.

    Call after :func:`load` verified the checkpoint; collective in a distributed run.
    """
    path = _resolve(path)
    shards = path.with_suffix(".dcp")
    if not shards.is_dir():
        raise CheckpointError(f"checkpoint {path} has no model/optimizer shards ({shards.name} is missing)")
    import torch.distributed.checkpoint as dcp

    try:
        with _single_process_quiet():
            dcp.load(template, checkpoint_id=str(shards))
    except Exception as e:
        raise CheckpointError(f"checkpoint {shards} could not be loaded into this run: {type(e).__name__}: "
                              f"{str(e)[:500]}") from None


def consolidate(path: str | Path) -> dict[str, Any]:
    """The checkpoint's model and optimizer state as plain (unsharded) tensors, in one process.

    For inspection and export, e.g. ``torch.save(consolidate(p)["model"], "model.pt")`` gives a state dict
    that ``model.load_state_dict`` takes.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = _resolve(path)
    load(path)  # verify first
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path.with_suffix(".dcp")), str(out))
        return torch.load(out, map_location="cpu", weights_only=True)
