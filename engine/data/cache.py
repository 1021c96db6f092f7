"""Data caches built once, atomically: a cache folder is complete or absent, never half there.

A builder writes into a temporary folder beside the final one, which is then renamed into place (a single
atomic step on one filesystem). A crash mid-build leaves only the temporary folder, which no reader ever
opens; a folder that exists but cannot be opened (from an older, non-atomic writer or a damaged disk) is
removed and rebuilt. Two processes racing to build the same cache both succeed: the loser's rename fails
and it uses the winner's folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def fsync_file(f) -> None:
    """Flush an open file to disk, so the rename never publishes data still in flight."""
    f.flush()
    os.fsync(f.fileno())


def open_or_build(folder: Path, open_: Callable[[Path], T | None], build: Callable[[Path], None],
                  announce: Callable[[], None] = lambda: None) -> T:
    """``open_(folder)``; if that gives None, ``build`` the folder (calling ``announce`` first) and reopen it.

    ``open_`` returns None for a missing or incomplete folder. ``build(tmp)`` fills the empty folder ``tmp``.
    """
    found = open_(folder)
    if found is not None:
        return found
    if folder.exists():  # incomplete or corrupt: never use it
        shutil.rmtree(folder, ignore_errors=True)
    announce()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if open_(folder) is None:  # lost a race to a broken folder: replace it
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    found = open_(folder)
    if found is None:
        raise RuntimeError(f"data cache at {folder} could not be read back after building it")
    return found
