"""Atomic file writes, shared by every stage that saves something (circuits, runs, reports).

A reader never sees a half-written file, and a write interrupted at any moment (even by
SIGKILL) leaves the previous version intact: the text goes to a temporary file in the same
directory (named ``.NAME.*.tmp``, which run directories clean up on resume), is flushed to
disk, and then replaces the target with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path.

    ``mode`` sets the permissions (``mkstemp`` would leave 0600, unreadable to others).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
