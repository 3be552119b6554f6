"""Atomic file writes and JSON reads, shared by every stage that saves or loads something.

A reader never sees a half-written file, and a write interrupted at any moment (even by
SIGKILL) leaves the previous version intact: the text goes to a temporary file in the same
directory (named ``.NAME.*.tmp``, which run directories clean up on resume), is flushed to
disk, and then replaces the target with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path.

    ``mode`` sets the permissions (``mkstemp`` would leave 0600, unreadable to others).
    """
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, with Python's cyclic garbage collector paused while it parses.

    A file listing millions of small ``[sender, receiver, score]`` lists makes the collector
    rescan every new list again and again (parsing takes several times longer); JSON holds
    no reference cycles, so the pause is safe. The collector's previous state is restored.
    Raises ``json.JSONDecodeError`` / ``UnicodeDecodeError`` for the caller to word.
    """
    text = Path(path).read_text(encoding="utf-8")
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(text)
    finally:
        if was_enabled:
            gc.enable()


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``; an existing ``dst`` is removed only afterwards."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
