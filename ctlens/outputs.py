"""Output directories: what a command may write, replace or delete in one. One rule for all.

Every command that writes a directory (``ctlens tune --out``, ``make-delta --out``,
``apply-delta --out``, and their functions) follows `check_output_dir`:

1. the output is not a file, not one of the inputs, and neither holds an input nor lies
   inside one (writing there could replace or mix with what is being read);
2. its entries are sorted into the command's *own*: those a previous output of the same
   kind wrote (the `OutputKind` recognises them by their content, e.g. a manifest's
   ``format``, never by their name alone) and hidden temporaries of ctlens writes, and
   the *user's*: everything else;
3. the user's entries are never deleted or replaced. Without ``overwrite`` a directory
   holding any is refused; with it the command writes beside them, and still refuses when
   one of them has a name the new output would take.

So ``overwrite`` only ever replaces what a previous output of the same kind wrote (a
different run, say); a previous output of the same kind is replaced without it.

Directories are written in a staging directory beside the target (`staging_dir`), then
moved into place: as a whole by `replace_dir` (atomic: the old output stays complete until
the new one is), or file by file into a directory that holds the user's entries
(`publish`). Staging directories are named after their writer (`ctlens.dir_lock.Owner`):
the next write to the same place removes those whose writer is gone, so a killed write
leaves nothing behind for long.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctlens.dir_lock import LOCK_NAME, Owner

STALE_AFTER_S = 120.0
"""A temporary whose name names no writer (older ctlens) is stale after this many seconds."""

_TAGGED = re.compile(r"\.(?:tmp|old)-(?P<tag>.+-\d+)-[^-]*$")


class OutputConflictError(ValueError):
    """The output directory is refused (the message says what is there and what to do)."""


@dataclass(frozen=True)
class OutputKind:
    """One kind of output directory.

    Attributes:
        what: its name in messages (``"ctlens delta"``).
        own: the entries of a directory that a previous output of this kind wrote,
            recognised by content.
    """

    what: str
    own: Callable[[Path], set[str]]


@dataclass(frozen=True)
class OutputPlan:
    """What `check_output_dir` allows: the directory, the previous output's own entries
    present (replaced), and the user's entries (kept, written beside)."""

    path: Path
    own: frozenset[str]
    users: tuple[str, ...]


def is_temporary(name: str) -> bool:
    """Whether an entry name is a hidden temporary (or the lock) of a ctlens write."""
    return name == LOCK_NAME or (name.startswith(".") and (".tmp" in name or ".old-" in name))


def check_output_dir(
    out: str | Path,
    kind: OutputKind,
    writes: Collection[str],
    inputs: Iterable[Any] = (),
    overwrite: bool = False,
) -> OutputPlan:
    """Check ``out`` before any work, by the module's rule; returns what may be replaced.

    Args:
        out: the output directory.
        kind: what the command writes there.
        writes: the top-level names the new output will write.
        inputs: what the command reads (paths are checked; other objects ignored).
        overwrite: write beside the user's entries (never over them).

    Raises:
        OutputConflictError: one line naming what is there and how to proceed.
    """
    out = Path(out)
    check_not_an_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputConflictError(f"the output {out} is a file, not a directory; give a "
                                  f"directory (new, empty, or a previous {kind.what})")
    if not out.is_dir():
        return OutputPlan(out, frozenset(), ())
    own = kind.own(out)
    users = tuple(sorted(
        p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
        if p.name not in own and not is_temporary(p.name)
    ))
    if users and not overwrite:
        shown = ", ".join(map(repr, users[:3])) + (", ..." if len(users) > 3 else "")
        raise OutputConflictError(
            f"{out} is not empty and holds no {kind.what} ({shown}); choose an empty or new "
            "directory, or pass overwrite=True (--overwrite) to write beside these files "
            "(they are kept)"
        )
    clash = [name for name in users if name.rstrip("/") in writes]
    if clash:
        raise OutputConflictError(
            f"{out} holds {', '.join(clash)} that no {kind.what} wrote; the output would "
            "replace them and --overwrite never deletes or replaces such files: move them "
            "away or choose another directory"
        )
    return OutputPlan(out, frozenset(own), users)


def check_not_an_input(out: Path, inputs: Iterable[Any]) -> None:
    """Refuse an output that is an input, holds one or lies inside one."""
    target = out.resolve()
    for item in inputs:
        if not isinstance(item, (str, Path)) or not Path(item).exists():
            continue
        source = Path(item).resolve()
        if target == source:
            raise OutputConflictError(f"the output {out} is also an input; write elsewhere")
        if target in source.parents:
            raise OutputConflictError(
                f"the output {out} holds the input {item}; write to a new directory beside it"
            )
        if source in target.parents:
            raise OutputConflictError(
                f"the output {out} lies inside the input {item}; write outside it"
            )


# ---------------------------------------------------------------------- staging, moving


def staging_dir(out: Path) -> Path:
    """A new hidden directory beside ``out`` to assemble it in, named after this process;
    stale ones of earlier writers to ``out`` are removed first (`remove_stale`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    prefix = f".{out.name}.tmp-{Owner.current().tag()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))


def remove_stale(out: Path) -> list[Path]:
    """Remove temporaries of ``out`` (``.NAME.tmp-*``, ``.NAME.old-*``) whose writer is gone:
    on this host by its pid; untagged ones (older ctlens) after `STALE_AFTER_S`. Returns
    what was removed."""
    removed = []
    now = time.time()
    for kind in ("tmp", "old"):
        for item in out.parent.glob(glob.escape(f".{out.name}.{kind}-") + "*"):
            match = _TAGGED.search(item.name[len(out.name) + 1:])
            owner = Owner.parse_tag(match["tag"]) if match else None
            try:
                stale = (not owner.alive()) if owner else now - item.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
            if stale:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(
                    missing_ok=True)
                removed.append(item)
    return removed


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``; an existing ``dst`` is removed only afterwards."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{Owner.current().tag()}-0")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def publish(staged: Path, plan: OutputPlan, order: Sequence[str]) -> None:
    """Move the staged output into ``plan.path``: as a whole (`replace_dir`) when the user
    has nothing there, else file by file in ``order`` (the previous output's other own
    entries removed first), leaving the user's entries as they are."""
    if not plan.users:
        replace_dir(staged, plan.path)
        return
    for name in plan.own - set(order):
        target = plan.path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for name in order:
        os.replace(staged / name, plan.path / name)
    shutil.rmtree(staged, ignore_errors=True)
