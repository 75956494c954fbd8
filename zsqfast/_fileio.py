"""Atomic file writes with ordinary permissions (the artifacts of synthesis, quantize, export)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_file_mode() -> int:
    """The permissions ``open()`` would give a new file under the current umask (mkstemp's are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, fsync it, then rename it over ``path`` (with
    the permissions of a file created by ``open()``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
