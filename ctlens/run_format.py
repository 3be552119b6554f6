"""The run directory format (``docs/run-format.md``): one spelling for writer and reader.

The tuner writes run directories (`ctlens.tuning.rundir`) and the visualiser reads them
(`ctlens.viz.run`); both take every name, the format version, the step pattern and the
checks of ``run.json`` and ``metrics.jsonl`` from here, so the two cannot drift apart.
Pure Python (no torch), so reading a run's description stays cheap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

FORMAT = "ctlens-run"
"""``run.json["format"]`` of every ctlens run directory."""
VERSION = 1
"""The format version this ctlens writes and reads."""

# ------------------------------------------------------------------ names

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CIRCUITS = "circuits"
CHECKPOINTS = "checkpoints"
MODEL = "model"
REPORT = "report.html"
INITIAL_WEIGHTS = "initial.safetensors"
"""The start weights, inside ``checkpoints/``."""
WEIGHTS = "weights.safetensors"
STATE = "state.pt"
CIRCUIT = "circuit.json"
"""Files of one checkpoint directory ``checkpoints/step_NNNNNN/``."""
WEIGHTS_DCP = "weights.dcp"
"""A checkpoint's folder in ``torch.distributed.checkpoint`` layout (``checkpoint_format="dcp"``):
``.metadata`` and one ``__R_0.distcp`` per writing rank, holding the weights (keys
``DCP_MODEL`` + HF name) and the optimizer state (``DCP_OPTIMIZER`` + HF name + ``.`` + state
key); it replaces `WEIGHTS`."""
DCP_MODEL = "model."
DCP_OPTIMIZER = "optimizer."
CHECKPOINT_CHECKSUMS = "checksums.json"
"""A checkpoint's ``{file name: sha256}``, written last, inside its directory."""

RUN_LOCK_HOLDER = "a ctlens tuning run"
"""Who holds a run directory's lock (`ctlens.dir_lock`), in the refusal's words."""

OWNED: tuple[str, ...] = (RUN_JSON, METRICS, CIRCUITS, CHECKPOINTS, MODEL, REPORT)
"""Top-level names a run owns inside its directory."""

STEP_PATTERN = re.compile(r"^step_(\d{6,})$")
"""A checkpoint directory's name, or a circuit snapshot's name without ``.json``."""

METRIC_KEYS: tuple[str, ...] = (
    "step", "target_metric", "general_loss", "circuit_edges", "params_moved", "evals",
    "wall_time",
)
"""Keys every ``metrics.jsonl`` record has."""

REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str, "task": str, "graph": dict, "config": dict,
}
"""Fields every ``run.json`` has, with their JSON types (checked by `check_run_doc`)."""


class RunFormatError(ValueError):
    """A run directory that does not follow docs/run-format.md."""


def step_name(step: int) -> str:
    """``step_NNNNNN``: the name of step ``step``'s checkpoint (and snapshot, + ``.json``)."""
    return f"step_{step:06d}"


def parse_step(name: str, suffix: str = "") -> int | None:
    """The step of a ``step_NNNNNN`` name (ending in ``suffix``), else None."""
    if suffix:
        if not name.endswith(suffix):
            return None
        name = name[: -len(suffix)]
    match = STEP_PATTERN.match(name)
    return int(match.group(1)) if match else None


def snapshot_name(step: int) -> str:
    """``step_NNNNNN.json``: the circuit snapshot of the evaluation at ``step``."""
    return step_name(step) + ".json"


# ------------------------------------------------------------------ checks


def check_run_doc(
    doc: Any, source: Path | str, required: tuple[str, ...] = ("graph",)
) -> dict[str, Any]:
    """Check a parsed ``run.json`` (format, version, the ``required`` fields of
    `REQUIRED_FIELDS` with their types); returns it, or raises `RunFormatError` naming
    ``source``. The visualiser needs the graph; the tuner, resuming, everything."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else doc
        raise RunFormatError(
            f"{source} is not a ctlens run description (expected \"format\": \"{FORMAT}\", "
            f"got {got!r})"
        )
    if doc.get("version") != VERSION:
        raise RunFormatError(
            f"{source} has run format version {doc.get('version')!r}; this ctlens reads and "
            f"writes version {VERSION}: use the ctlens version that wrote the run"
        )
    for key in required:
        if not isinstance(doc.get(key), REQUIRED_FIELDS[key]):
            what = "has no" if key not in doc else f"has a {type(doc[key]).__name__} for"
            raise RunFormatError(
                f"{source} {what} \"{key}\"; it was not written by ctlens, or was edited: "
                "restore it from a copy, or move it away to start a new run in its directory"
            )
    return doc


def read_run_doc(
    run_dir: Path, required: tuple[str, ...] = ("graph",)
) -> dict[str, Any] | None:
    """``run_dir/run.json`` checked by `check_run_doc`; None when there is no such file."""
    path = run_dir / RUN_JSON
    if path.is_dir():  # worded as ctlens.files.describe_path does (pure Python here)
        raise RunFormatError(f"{path} is a directory, not a file, so {run_dir} holds no "
                             "readable run description; move it away")
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFormatError(
            f"{path} is not valid JSON ({err}); it may be truncated: restore it from a copy, or "
            "move it away to start a new run in its directory"
        ) from None
    return check_run_doc(doc, path, required)


def missing_metric_keys(record: dict[str, Any]) -> list[str]:
    """The required ``metrics.jsonl`` keys that ``record`` lacks."""
    return [k for k in METRIC_KEYS if k not in record]
