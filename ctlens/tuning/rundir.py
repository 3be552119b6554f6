"""The tuner's side of the run directory: its layout and every file operation on it.

Names come from `ctlens.run_format` (``docs/run-format.md``). Every write is atomic: files
via a temporary name and ``os.replace``; a checkpoint is assembled in ``checkpoints/.tmp-*``
(its files, then ``checksums.json`` with their sha256) and renamed to
``checkpoints/step_NNNNNN`` when complete, so a process killed at any moment leaves either
the previous or the new checkpoint, never a torn one. ``metrics.jsonl`` is appended line by
line; on resume it is cut back to the records of steps the checkpoint covers (a torn last
line is dropped).

Writing fails cleanly: a full disk or a read-only directory raises `RunWriteError` (one
sentence naming the file and what was kept), and the partial temporary files are removed.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctlens import run_format as F
from ctlens.dir_lock import LOCK_NAME, DirLock
from ctlens.files import atomic_write_text, sha256_file
from ctlens.outputs import OutputConflictError, OutputKind, check_output_dir, is_temporary

# errors that mean "this directory cannot take the write", not a bug
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class RunConflictError(ValueError):
    """The output directory holds a different run (or something that is not a run)."""


class RunWriteError(OSError):
    """The run directory could not be written (disk full, read-only, no permission)."""


@dataclass
class RunDir:
    """Paths of one run directory, and the file operations the tuner performs on it."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / F.RUN_JSON

    @property
    def metrics(self) -> Path:
        return self.root / F.METRICS

    @property
    def circuits(self) -> Path:
        return self.root / F.CIRCUITS

    @property
    def checkpoints(self) -> Path:
        return self.root / F.CHECKPOINTS

    @property
    def model(self) -> Path:
        return self.root / F.MODEL

    @property
    def initial_weights(self) -> Path:
        return self.checkpoints / F.INITIAL_WEIGHTS

    def circuit_file(self, step: int) -> Path:
        return self.circuits / F.snapshot_name(step)

    # ------------------------------------------------------------------ run.json

    def read_run(self) -> dict[str, Any] | None:
        """``run.json`` if present; raises `RunConflictError` if it is not a ctlens run."""
        try:
            return F.read_run_doc(self.root, tuple(F.REQUIRED_FIELDS))
        except F.RunFormatError as err:
            raise RunConflictError(str(err)) from None

    def write_run(self, doc: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_json, json.dumps(doc, indent=2) + "\n")

    def clear(self) -> None:
        """Remove what a run owns (``overwrite`` of another ctlens run); nothing else."""
        for name in F.OWNED:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def own_entries(self) -> set[str]:
        """What a ctlens run wrote here (`ctlens.outputs`' rule decides the rest).

        With a readable ``run.json``: every name a run owns that is present. Without one,
        a ``checkpoints/`` holding only the start weights (a run stopped before it wrote
        ``run.json``). Anything else, including a user's own ``model/`` or
        ``report.html``, is the user's.
        """
        if not self.root.is_dir():
            return set()
        try:
            if self.read_run() is not None:
                return {name for name in F.OWNED if (self.root / name).exists()}
        except RunConflictError:
            return set()
        partial = self.checkpoints.is_dir() and all(
            q.name == F.INITIAL_WEIGHTS or is_temporary(q.name) for q in self.checkpoints.iterdir()
        )
        return {F.CHECKPOINTS} if partial else set()

    def check_output(self, overwrite: bool) -> None:
        """Refuse, by `ctlens.outputs.check_output_dir`'s rule (the delta commands' too), a
        directory that holds the user's files (unless ``overwrite``: a run is then written
        beside them) or a user's file where a run writes."""
        try:
            check_output_dir(self.root, RUN_OUTPUT, F.OWNED, (), overwrite)
        except OutputConflictError as err:
            raise RunConflictError(str(err)) from None

    def lock(self) -> DirLock:
        """Take the directory's lock for this process (`ctlens.dir_lock`): a second tuner on
        the same directory stops at once, naming the process that holds it."""
        if self.root.exists() and not self.root.is_dir():
            raise RunConflictError(f"{self.root} is a file, not a directory; choose a directory")
        held = DirLock(self.root, F.RUN_LOCK_HOLDER)
        held.acquire()
        return held

    # ------------------------------------------------------------------ metrics

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Complete records of ``metrics.jsonl`` (a torn last line is ignored)."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def truncate_metrics(self, max_step: int) -> None:
        """Keep only records with ``step <= max_step`` (rewritten atomically)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= max_step]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for p in self.checkpoints.iterdir():
            step = F.parse_step(p.name)
            if step is not None and p.is_dir() and (p / F.STATE).is_file():
                steps.append(step)
        return sorted(steps)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / F.step_name(step)

    def clean_temporaries(self) -> None:
        """Remove leftovers of writes interrupted by a kill."""
        for folder in (self.root, self.checkpoints, self.circuits):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if is_temporary(p.name) and p.name != LOCK_NAME:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def new_checkpoint_tmp(self) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.checkpoints))

    def commit_checkpoint(self, tmp: Path, step: int, keep: int) -> None:
        """Seal ``tmp`` with its checksums, rename it to the step's checkpoint, then drop
        all but the newest ``keep``."""
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*")
                       if p.is_file() and p.name != F.CHECKPOINT_CHECKSUMS)
        sums = {name: sha256_file(tmp / name) for name in files}
        write_bytes(tmp / F.CHECKPOINT_CHECKSUMS, (json.dumps(sums, indent=1) + "\n").encode())
        final = self.checkpoint_dir(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoint_steps()[:-keep]:
            shutil.rmtree(self.checkpoint_dir(old), ignore_errors=True)

    def checkpoint_damage(self, step: int, checksummed: bool = True) -> str | None:
        """Why checkpoint ``step`` fails its recorded checksums (None: intact).

        ``checksummed``: the run records checksums (``initial_sha256`` in ``run.json``), so
        every checkpoint it wrote has ``checksums.json`` (sealed in before the checkpoint's
        rename): one without it was changed afterwards and is not trusted. Runs of an older
        ctlens (False) record none, and their checkpoints pass unverified.
        """
        folder = self.checkpoint_dir(step)
        manifest = folder / F.CHECKPOINT_CHECKSUMS
        if not manifest.is_file():
            return (f"{F.CHECKPOINT_CHECKSUMS} is missing, so its files cannot be verified"
                    if checksummed else None)
        try:
            sums = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{F.CHECKPOINT_CHECKSUMS} is unreadable"
        for name, digest in sums.items():
            if not (folder / name).is_file():
                return f"{name} is missing"
            if sha256_file(folder / name) != digest:
                return f"{name} does not match its sha256"
        return None

    def set_aside(self, step: int) -> Path:
        """Rename a damaged checkpoint to ``step_NNNNNN.damaged`` (kept for inspection)."""
        source = self.checkpoint_dir(step)
        target = source.with_name(source.name + ".damaged")
        n = 1
        while target.exists():
            n += 1
            target = source.with_name(f"{source.name}.damaged{n}")
        os.replace(source, target)
        return target

    # ------------------------------------------------------------------ write errors

    @contextlib.contextmanager
    def writing(self, what: str, kept: str) -> Iterator[None]:
        """Turn a full disk or a read-only directory during ``what`` into `RunWriteError`.

        ``kept`` says what survives (for example the newest checkpoint).
        """
        try:
            yield
        except OSError as err:
            if err.errno not in _WRITE_ERRNOS or isinstance(err, RunWriteError):
                raise
            reason = os.strerror(err.errno).lower()
            where = f" ({err.filename})" if err.filename else ""
            raise RunWriteError(
                err.errno,
                f"could not write {what} in {self.root}: {reason}{where}; {kept}. Free some "
                "space (or make the directory writable) and run the same command again to "
                "resume",
            ) from None


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk (every binary file of a run).

    Serialising in memory first means a full disk surfaces here as a plain ``OSError``
    (``ENOSPC``), not as a serialiser's own error.
    """
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def save_torch(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


RUN_OUTPUT = OutputKind("ctlens run", lambda root: RunDir(root).own_entries())
"""A run directory as `ctlens.outputs` sees it."""
