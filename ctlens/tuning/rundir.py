"""The tuner's side of the run directory (``docs/run-format.md``; names in `ctlens.run_format`).

Every write is atomic: files via a temporary name and ``os.replace``; a checkpoint is
assembled in ``checkpoints/.tmp-*`` and renamed to ``checkpoints/step_NNNNNN`` when
complete, so a process killed at any moment leaves either the previous or the new
checkpoint, never a torn one. ``metrics.jsonl`` is appended line by line; on resume it is
cut back to the records of steps the checkpoint covers (a torn last line is dropped).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctlens import run_format as F
from ctlens.files import atomic_write_text
from ctlens.tuning.weights import write_json_atomic


class RunConflictError(ValueError):
    """The output directory holds a different run (or something that is not a run)."""


@dataclass
class RunDir:
    """Paths of one run directory."""

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
            return F.read_run_doc(self.root)
        except F.RunFormatError as err:
            raise RunConflictError(str(err)) from None

    def write_run(self, doc: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_json, doc)

    def clear(self) -> None:
        """Remove what a run owns (for ``overwrite``); other files are left alone."""
        for name in F.OWNED:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def foreign_entries(self) -> list[str]:
        """Entries of the directory that a run does not own (hidden temporaries excluded)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.name not in F.OWNED and not p.name.startswith("."))

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
                if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def new_checkpoint_tmp(self) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.checkpoints))

    def commit_checkpoint(self, tmp: Path, step: int, keep: int) -> None:
        """Rename ``tmp`` to the step's checkpoint, then drop all but the newest ``keep``."""
        final = self.checkpoint_dir(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoint_steps()[:-keep]:
            shutil.rmtree(self.checkpoint_dir(old), ignore_errors=True)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
