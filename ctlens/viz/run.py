"""Read a tuning run directory (docs/run-format.md; names in `ctlens.run_format`) for plotting.

Only the files that format lists are read: ``run.json``, ``metrics.jsonl`` and
``circuits/step_NNNNNN.json``. Every problem is a `RunFormatError` (a ``ValueError``) that
says which file is wrong and what to do about it, because the usual causes are a wrong path,
a run that has not evaluated yet, or two runs written into one directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctlens import run_format as F
from ctlens.file_limits import declared_graph
from ctlens.files import require_dir, require_file
from ctlens.graph import Graph
from ctlens.run_format import RunFormatError

__all__ = ["Run", "RunFormatError", "load_circuit", "read_run"]


def load_circuit(path: str | Path) -> Any:
    """`Circuit.load` with an error that names the file when it is missing or unreadable."""
    from ctlens.circuit import Circuit

    path = require_file(path, "circuit file", "pass a file written by Circuit.save (for "
                        "example RUN_DIR/circuits/step_000000.json)")
    try:
        return Circuit.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise RunFormatError(f"{path} is not a readable ctlens circuit: {err}") from err


@dataclass
class Run:
    """A run directory's contents: its ``run.json``, metric rows and circuit snapshots.

    ``circuits`` maps step -> `Circuit`, in step order; all share ``graph``.
    """

    path: Path
    info: dict[str, Any]
    metrics: list[dict[str, Any]]
    circuits: dict[int, Any]
    graph: Graph
    snapshot_files: dict[int, Path] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        """The run's `TuneConfig` fields (``run.json["config"]``)."""
        return dict(self.info.get("config") or {})

    @property
    def steps(self) -> list[int]:
        """Steps that have a circuit snapshot, ascending."""
        return list(self.circuits)

    def circuit(self, step: int) -> Any:
        """The snapshot at ``step``; a clear error listing the available steps otherwise."""
        if step not in self.circuits:
            raise KeyError(
                f"{self.path} has no circuit snapshot for step {step}; "
                f"available steps: {_short_list(self.steps)}"
            )
        return self.circuits[step]

    def metric_series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a numeric metric key, skipping rows that lack it."""
        xs: list[int] = []
        ys: list[float] = []
        for row in self.metrics:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs.append(int(row["step"]))
                ys.append(float(value))
        return xs, ys

    def eval_series(self) -> dict[str, tuple[list[int], list[float]]]:
        """(steps, values) of every task in the rows' ``evals`` objects."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for row in self.metrics:
            for name, value in (row.get("evals") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    xs, ys = out.setdefault(name, ([], []))
                    xs.append(int(row["step"]))
                    ys.append(float(value))
        return out


def _short_list(items: list[Any], n: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "") if items else "none"


def _read_info(path: Path) -> dict[str, Any]:
    info = F.read_run_doc(path)
    if info is None:
        raise RunFormatError(
            f"{path / F.RUN_JSON} is missing, so {path} is not a ctlens run directory "
            "(docs/run-format.md); pass the out_dir that CircuitTuner.run wrote"
        )
    return info


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    file = path / F.METRICS
    if not file.is_file():
        raise RunFormatError(
            f"{file} is missing: the run has not finished its first evaluation, or this is "
            "not a run directory; wait for the step-0 evaluation or re-run the tuner"
        )
    text = file.read_text()
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break  # the last line is still being appended by a live run
            raise RunFormatError(f"{file}, line {number}: not valid JSON ({err})") from err
        missing = F.missing_metric_keys(row)
        if missing:
            raise RunFormatError(
                f"{file}, line {number}: missing required key(s) {missing} "
                "(docs/run-format.md lists them)"
            )
        rows.append(row)
    if not rows:
        raise RunFormatError(f"{file} has no evaluations yet; wait for the step-0 evaluation")
    rows.sort(key=lambda r: int(r["step"]))
    for row in rows:
        for key in ("target_metric", "general_loss", "params_moved"):
            value = row.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None  # plotted as a gap, not a crash
    return rows


def read_run(run_dir: str | Path) -> Run:
    """Read and check a run directory: run.json, metrics.jsonl and every circuit snapshot.

    Raises `RunFormatError` when a file is missing or malformed, when there are no
    snapshots, or when the snapshots do not all share the graph in run.json.
    """
    path = require_dir(run_dir, "run directory", "pass the out_dir given to CircuitTuner.run")
    info = _read_info(path)
    try:
        graph = declared_graph(info["graph"], str(path / F.RUN_JSON))
    except (ValueError, TypeError) as err:
        raise RunFormatError(str(err)) from err
    metrics = _read_metrics(path)
    circuits_dir = path / F.CIRCUITS
    files: dict[int, Path] = {}
    if circuits_dir.is_dir():
        for file in circuits_dir.iterdir():
            step = F.parse_step(file.name, ".json")
            if step is not None:
                files[step] = file
    if not files:
        raise RunFormatError(
            f"{circuits_dir} holds no circuit snapshots (circuits/step_NNNNNN.json): the run "
            "has not evaluated yet, or it is a full/LoRA baseline that tracks no circuit; "
            "plot its metrics from metrics.jsonl instead"
        )
    circuits: dict[int, Any] = {}
    for step in sorted(files):
        circuit = load_circuit(files[step])
        if circuit.graph != graph:
            raise RunFormatError(
                f"{files[step]} is a circuit of a different graph "
                f"({circuit.graph._describe()}) than run.json says ({graph._describe()}); all "
                "snapshots of a run share one graph: were two runs written to one directory? "
                "Move the stray snapshots out or give each run its own out_dir"
            )
        circuits[step] = circuit
    return Run(path, info, metrics, circuits, graph, {s: files[s] for s in sorted(files)})
