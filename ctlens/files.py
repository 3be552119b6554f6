"""Atomic file writes, JSON reads, and the one wording of what a path is.

A reader never sees a half-written file, and a write interrupted at any moment (even by
SIGKILL) leaves the previous version intact: the text goes to a temporary file in the same
directory (named ``.NAME.*.tmp``, which run directories clean up on resume), is flushed to
disk, and then replaces the target with ``os.replace``.

Every error about a path of the wrong kind (a directory where a file was expected, a file
where a directory was, a missing file, a parent that is a file) is worded by
`describe_path` and raised by `require_file` / `require_dir` / `parent_directory`, as the
matching ``OSError`` subclass with one line that names the path.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
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
    parent_directory(path)
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


def describe_path(path: str | Path) -> str:
    """What ``path`` is, for an error message: ``"a directory"``, ``"a file"``, ``"missing"``,
    or ``"missing (ANCESTOR is a file, not a directory)"`` when a parent is a file."""
    path = Path(path)
    if path.is_dir():
        return "a directory"
    if path.exists():
        return "a file"
    ancestor = _file_ancestor(path)
    return "missing" if ancestor is None else f"missing ({ancestor} is a file, not a directory)"


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is not a directory (else None)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def require_file(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a file; else ``FileNotFoundError`` or ``IsADirectoryError`` saying
    ``"{what} {path} is a directory, not a file"`` (or ``does not exist``), then ``hint``."""
    path = Path(path)
    if path.is_file():
        return path
    tail = f"; {hint}" if hint else ""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory, not a file{tail}")
    raise FileNotFoundError(f"{what} {path} {_missing(path)}{tail}")


def require_dir(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` if it is a directory; else ``FileNotFoundError`` or ``NotADirectoryError``
    saying ``"{what} {path} is a file, not a directory"`` (or ``does not exist``)."""
    path = Path(path)
    if path.is_dir():
        return path
    tail = f"; {hint}" if hint else ""
    if path.exists():
        raise NotADirectoryError(f"{what} {path} is a file, not a directory{tail}")
    raise FileNotFoundError(f"{what} {path} {_missing(path)}{tail}")


def _missing(path: Path) -> str:
    ancestor = _file_ancestor(path)
    return "does not exist" if ancestor is None else (
        f"does not exist: {ancestor} is a file, not a directory")


def parent_directory(path: str | Path) -> Path:
    """Create the directory that will hold ``path`` (and its parents); returns it.

    Raises ``NotADirectoryError`` naming the file when a parent is a file (``mkdir`` would
    say only ``[Errno 17] File exists``).
    """
    parent = Path(path).parent
    ancestor = parent if parent.exists() and not parent.is_dir() else _file_ancestor(parent)
    if ancestor is not None:
        raise NotADirectoryError(
            f"cannot write {path}: {ancestor} is a file, not a directory; choose another path"
        )
    parent.mkdir(parents=True, exist_ok=True)
    return parent


WEIGHTS_INDEX = "model.safetensors.index.json"
"""The index of a sharded HF model directory's ``*.safetensors`` files."""


def safetensors_header(path: str | Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file, once its header and length check out.

    Raises ``ValueError`` naming the file when it is cut short or not a safetensors file at
    all (safetensors' own message is kept in parentheses), and the ``OSError`` subclasses of
    `require_file` when it is missing or a directory.
    """
    from safetensors import SafetensorError, safe_open

    require_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or damaged; "
            "copy or download it again"
        ) from None


def weight_files(path: str | Path) -> list[Path]:
    """The ``.safetensors`` files of a weights file or HF model directory, in name order.

    A directory with ``model.safetensors.index.json`` must hold exactly the shards its
    index names: a missing one (an interrupted download) or an extra one is an error that
    names it.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a readable weights index ({err!r}); copy or "
                             "download it again") from None
        missing = sorted(listed - {f.name for f in files})
        if missing:
            raise FileNotFoundError(
                f"{path} lacks {missing[0]}, one of the {len(listed)} weights files its "
                f"{WEIGHTS_INDEX} lists ({len(missing)} missing; an interrupted download?): "
                "copy or download it again"
            )
        extra = sorted({f.name for f in files} - listed)
        if extra:
            raise ValueError(f"{path} holds {extra[0]}, which its {WEIGHTS_INDEX} does not "
                             "list; remove the stray file or restore the index")
    if not files:
        raise FileNotFoundError(
            f"{path} is neither a .safetensors file nor a model directory holding "
            "*.safetensors weights"
        )
    return files


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """Every tensor of a ``.safetensors`` file (on the CPU), checked as `safetensors_header`
    checks it."""
    from safetensors.torch import load_file

    safetensors_header(path)
    return load_file(str(path))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
