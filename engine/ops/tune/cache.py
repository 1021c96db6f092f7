"""5. Keep: the on-disk cache of decisions (:class:`TuneCache`)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ...kernels_package import KERNELS_PACKAGE

#: Bumped when the meaning of a cache entry changes.
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# 5. Keep: the on-disk cache
# ---------------------------------------------------------------------------------------------------

def cache_dir(setting: str = "") -> Path:
    """``kernels.tune_cache``, else $XDG_CACHE_HOME/tritonforge, else ~/.cache/tritonforge."""
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tritonforge"


def _driver_version() -> str:
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return f"cuda {torch.version.cuda}"


def kernel_sources_hash() -> str:
    """SHA-256 of the kernels package's sources and of the op table's and the tuner's (the candidates)."""
    import importlib.util

    digest = hashlib.sha256()
    kernels_dir = Path(importlib.util.find_spec(KERNELS_PACKAGE).origin).parent
    ops_dir = Path(__file__).parent.parent
    for path in sorted(kernels_dir.glob("*.py")) + sorted(ops_dir.glob("*.py")) + sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def environment_key(device: torch.device) -> dict[str, Any]:
    """What makes a measurement stale when it changes: the card, its driver, torch, triton, the kernels."""
    key: dict[str, Any] = {"version": CACHE_VERSION, "torch": torch.__version__, "kernels": kernel_sources_hash()}
    try:
        import triton
        key["triton"] = triton.__version__
    except ImportError:
        key["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key.update(gpu=props.name, sms=props.multi_processor_count, driver=_driver_version())
    else:
        key.update(gpu=device.type)
    return key


class TuneCache:
    """One JSON file per key under ``<folder>/tune/``: ``{"key": ..., "value": ...}``.

    Written to a temporary file and renamed into place, so a reader sees a whole entry or none; an entry
    that does not parse, or holds another key, is ignored with a warning and measured again.
    Besides the ops' decisions it holds any per-kernel choice (``kind="kernel-config"``: a Triton kernel's
    tile configuration, say) under the same environment key.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder) / "tune"

    def _path(self, key: dict) -> Path:
        text = json.dumps(key, sort_keys=True)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def get(self, key: dict) -> dict | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            if entry["key"] != json.loads(json.dumps(key)):
                raise ValueError("the entry holds another key")
            return entry["value"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            warnings.warn(f"kernels tune: ignoring the damaged cache entry {path} ({type(e).__name__}: {e}); "
                          f"measuring again", RuntimeWarning, stacklevel=2)
            return None

    def put(self, key: dict, value: dict) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".entry.", suffix=".tmp", dir=self.folder)
            with os.fdopen(fd, "w") as f:
                json.dump({"key": key, "value": value}, f, indent=1)
            os.replace(tmp, self._path(key))
        except OSError as e:  # a read-only or full disk costs the next run a measurement, nothing more
            warnings.warn(f"kernels tune: could not write the cache in {self.folder}: {e}", RuntimeWarning,
                          stacklevel=2)

    def kernel_config(self, kernel: str, key: dict, device: torch.device) -> dict | None:
        """A kernel's kept configuration for ``key`` (its shapes) on this card and these versions."""
        return self.get({"kind": "kernel-config", "kernel": kernel, "env": environment_key(device), "key": key})

    def keep_kernel_config(self, kernel: str, key: dict, device: torch.device, config: dict) -> None:
        self.put({"kind": "kernel-config", "kernel": kernel, "env": environment_key(device), "key": key}, config)
