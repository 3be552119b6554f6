"""The run directory (format v1, ``docs/run-format.md``) and the tuner's checkpoints.

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
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctlens.files import atomic_write_text
from ctlens.tuning.weights import write_json_atomic

FORMAT = "ctlens-run"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
# Names a run owns inside its directory; `overwrite` removes only these.
OWNED = ("run.json", "metrics.jsonl", "circuits", "checkpoints", "model", "report.html")


class RunConflictError(ValueError):
    """The output directory holds a different run (or something that is not a run)."""


@dataclass
class RunDir:
    """Paths of one run directory."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def circuits(self) -> Path:
        return self.root / "circuits"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def initial_weights(self) -> Path:
        return self.checkpoints / "initial.safetensors"

    def circuit_file(self, step: int) -> Path:
        return self.circuits / f"step_{step:06d}.json"

    # ------------------------------------------------------------------ run.json

    def read_run(self) -> dict[str, Any] | None:
        """``run.json`` if present; raises `RunConflictError` if it is not a ctlens run."""
        if not self.run_json.is_file():
            return None
        try:
            doc = json.loads(self.run_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunConflictError(f"{self.run_json} is not valid JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RunConflictError(f"{self.run_json} is not a ctlens run description")
        if doc.get("version") != VERSION:
            raise RunConflictError(
                f"{self.run_json} has run format version {doc.get('version')}; this ctlens "
                f"writes version {VERSION}"
            )
        return doc

    def write_run(self, doc: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_json, doc)

    def clear(self) -> None:
        """Remove what a run owns (for ``overwrite``); other files are left alone."""
        for name in OWNED:
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
                      if p.name not in OWNED and not p.name.startswith("."))

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
            match = _STEP_DIR.match(p.name)
            if match and p.is_dir() and (p / "state.pt").is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

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
