"""The run-directory protocol: prepare or resume a run, write and read its checkpoints.

- :func:`prepare_run` (rank 0): an empty or new directory gets the start weights and
  ``run.json`` (with the start weights' sha256 and a record of the run's data); a directory
  holding the same run resumes from its newest *intact* checkpoint (metrics cut back to
  it); a different run, a run on other data, or a directory that is not a run is refused.
  ``overwrite`` replaces another ctlens run (only the names a run owns) but never deletes
  files that no run wrote.
- :func:`save_checkpoint` assembles ``checkpoints/.tmp-*`` (weights, state, circuit, then
  their checksums) and renames it into place; :func:`load_checkpoint` reads one back.
- :func:`export_model` writes the plain HF model directory at the end.

A checkpoint's weights are ``weights.safetensors`` (consolidated) or, with
``checkpoint_format="dcp"``, ``weights.dcp/`` written by every rank
(`ctlens.tuning.sharded_checkpoints`); both are read here, whichever the run uses now.

A checkpoint whose files fail their checksums, or cannot be parsed (truncated, flipped
header), is set aside (renamed ``step_NNNNNN.damaged``) and the next older one is used,
with one warning; without any, the run restarts from its start weights. Run directories
written before checksums existed resume with one warning that they cannot be verified.
The layout and the file operations are `ctlens.tuning.rundir`'s; names `ctlens.run_format`'s.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ctlens import run_format as F
from ctlens.circuit import Circuit
from ctlens.file_limits import graph_shape
from ctlens.graph import Graph, GraphSpec
from ctlens.tuning import sharded_checkpoints as S
from ctlens.tuning import weights as W
from ctlens.tuning.checkpoint_state import CheckpointState, state_dict
from ctlens.tuning.config import OPERATIONAL_FIELDS, TuneConfig
from ctlens.tuning.rundir import RunConflictError, RunDir, load_torch, save_torch, sha256_file

# what reading a damaged checkpoint file raises (safetensors, torch's zip reader, pickle)
_DAMAGE = (SafetensorError, RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError,
           KeyError, ValueError)


class RunDirWarning(UserWarning):
    """Something about a resumed run directory that the user should know (one line)."""


# ---------------------------------------------------------------------- the run's data


def data_record(task: Any, positional: bool = False) -> dict[str, Any]:
    """What defines a run's data: sizes and sha256 of every tensor the tuner reads.

    Stored in ``run.json`` as ``data``; resuming on different data (another ``--n``,
    ``--n-train``, seed or task file) is refused, naming the field that differs. A
    ``positional`` run (``TuneConfig.spans``) also records its span labels
    (``spans_sha256``: the training rows', the discovery pairs' and the evaluation sets').
    """
    train = (task.train_tokens, task.train_target_mask, task.train_attention_mask)
    general = getattr(task, "general_tokens", None)
    spans: dict[str, str] = {}
    if positional:
        sets = [getattr(task, "train_data", None), task.discovery, *task.evals.values()]
        spans["spans_sha256"] = _digest(*[getattr(d, "spans", None) for d in sets])
    return {  # sizes first: a mismatch names the most telling field
        "n_train": int(task.train_tokens.shape[0]),
        "train_length": int(task.train_tokens.shape[1]),
        "n_discovery": len(task.discovery),
        "evals": {name: len(data) for name, data in task.evals.items()},
        "n_general": 0 if general is None else int(general.shape[0]),
        "train_sha256": _digest(*train),
        "discovery_sha256": _digest(*_task_tensors(task.discovery)),
        "evals_sha256": _digest(*[t for d in task.evals.values() for t in _task_tensors(d)]),
        "general_sha256": _digest(general, getattr(task, "general_attention_mask", None)),
        **spans,
    }


def _task_tensors(data: Any) -> list[torch.Tensor | None]:
    return [getattr(data, name, None) for name in
            ("clean", "corrupt", "correct", "wrong", "positions", "attention_mask")]


def _digest(*tensors: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        if t is None:
            digest.update(b"none")
            continue
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        t = t.detach().cpu().contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------- prepare / resume


def prepare_run(
    rd: RunDir, model: Any, doc: dict[str, Any], config: TuneConfig, overwrite: bool
) -> tuple[int, float]:
    """Refuse, create, clear or resume ``rd``; return ``(start_step, wall_time_so_far)``."""
    if rd.root.exists() and not rd.root.is_dir():
        raise RunConflictError(f"{rd.root} is a file, not a directory; choose a directory")
    try:
        existing = rd.read_run()
    except RunConflictError as err:
        if not overwrite:
            raise
        raise RunConflictError(
            f"{err}. --overwrite does not delete it: without a readable {F.RUN_JSON} ctlens "
            f"cannot tell which files of {rd.root} a run wrote"
        ) from None
    if existing and not same_run(existing, doc, config):
        if not overwrite:
            raise RunConflictError(
                f"{rd.root} holds a different run ({describe_difference(existing, doc)}); "
                f"{_steps_note(existing, doc)}choose another output directory or pass "
                "overwrite=True (--overwrite) to replace it"
            )
        rd.clear()
        existing = None
    if not existing:
        _create(rd, model, doc, overwrite)
        return 0, 0.0
    return _resume(rd, model, existing, doc, config)


def _create(rd: RunDir, model: Any, doc: dict[str, Any], overwrite: bool) -> None:
    rd.check_output(overwrite)
    with rd.writing("the run's start weights and run.json", "nothing was lost"):
        rd.root.mkdir(parents=True, exist_ok=True)
        rd.clean_temporaries()
        rd.checkpoints.mkdir(exist_ok=True)
        tmp = rd.checkpoints / ".initial.tmp.safetensors"
        try:
            W.save_weights(model, tmp)
            tmp.replace(rd.initial_weights)
        finally:
            tmp.unlink(missing_ok=True)
        rd.write_run({**doc, "initial_sha256": sha256_file(rd.initial_weights)})
        rd.circuits.mkdir(parents=True, exist_ok=True)


def _resume(
    rd: RunDir, model: Any, existing: dict[str, Any], doc: dict[str, Any], config: TuneConfig
) -> tuple[int, float]:
    """Resume the run in ``rd`` from its newest intact checkpoint."""
    _check_data(rd, existing, doc)
    damaged: list[tuple[int, str]] = []
    start, wall = 0, 0.0
    for step in reversed(rd.checkpoint_steps()):
        reason = rd.checkpoint_damage(step, checksummed="initial_sha256" in existing)
        if reason is None:
            reason, state_wall = _try_read(rd, step, model, config, doc["graph"])
            if reason is None:
                start, wall = step, state_wall
                break
        damaged.append((step, reason))
    if start > config.steps:
        raise RunConflictError(f"{rd.root} has a checkpoint past steps={config.steps}")
    _check_initial(rd, model, existing)
    with rd.writing("the resumed run's files", "the checkpoints are unchanged"):
        rd.clean_temporaries()
        for step, _ in damaged:
            rd.set_aside(step)
        if damaged:
            names = "; ".join(f"step {s}: {why}" for s, why in damaged)
            target = f"checkpoint step {start}" if start else "the start weights"
            warnings.warn(
                f"{rd.root}: damaged checkpoint(s) set aside as step_NNNNNN.damaged ({names});"
                f" resuming from {target}, the newest intact one", RunDirWarning, stacklevel=2,
            )
        if start == 0:
            # killed (or damaged) before the first usable checkpoint: restart from the start
            W.load_weights(model, rd.initial_weights)
            if rd.metrics.exists():
                rd.truncate_metrics(-1)
        else:
            rd.truncate_metrics(start)
        rd.circuits.mkdir(parents=True, exist_ok=True)
    return start, wall


def _try_read(
    rd: RunDir, step: int, model: Any, config: TuneConfig, graph: dict[str, Any]
) -> tuple[str | None, float]:
    """Parse checkpoint ``step`` (weights header, state); ``(why it is damaged, wall time)``.

    A checkpoint of another model, or whose ``state.pt`` another run wrote (another config
    or graph: a checkpoint folder copied between runs), raises `CheckpointMismatchError`
    naming the file (refused, not skipped).
    """
    folder = rd.checkpoint_dir(step)
    try:
        if S.is_dcp(folder):
            S.check_dcp(model, folder)
        else:
            W.check_weights(model, folder / F.WEIGHTS)
    except W.CheckpointMismatchError:
        raise
    except _DAMAGE as err:
        return f"{F.WEIGHTS} is unreadable ({type(err).__name__})", 0.0
    try:
        saved = load_torch(folder / F.STATE)
        wall = float(saved["wall_time"])
    except _DAMAGE as err:
        return f"{F.STATE} is unreadable ({type(err).__name__})", 0.0
    other = _other_run(saved, config, graph)
    if other:
        raise W.CheckpointMismatchError(
            f"{folder / F.STATE} was written by another run ({other}), not by the run in "
            f"{rd.root}; move {folder.name} out of {rd.checkpoints} to resume from the one "
            "before it, or start anew with another --out"
        )
    return None, wall


def _other_run(saved: dict[str, Any], config: TuneConfig, graph: dict[str, Any]) -> str:
    """How a checkpoint's state differs from this run's config and graph ("" if it does
    not)."""
    try:
        recorded = TuneConfig.from_dict(json.loads(saved.get("config") or "{}"))
    except (TypeError, ValueError):
        return "its config is unreadable"
    old, new = recorded.semantic_dict(), config.semantic_dict()
    differ = [f"{k}: {old.get(k)!r} vs {new.get(k)!r}" for k in sorted(set(old) | set(new))
              if old.get(k) != new.get(k)]
    if differ:
        return "; ".join(differ[:3])
    senders, receivers = graph_shape(GraphSpec.from_dict(graph))
    mask = saved.get("circuit_mask")  # [senders, receivers] (and spans, when positional)
    if mask is not None and tuple(mask.shape[:2]) != (senders, receivers):
        return (f"a circuit over {mask.shape[0]} x {mask.shape[1]} edges, but this model's "
                f"graph has {senders} x {receivers}")
    return ""


def _check_data(rd: RunDir, existing: dict[str, Any], doc: dict[str, Any]) -> None:
    old = existing.get("data")
    if old is None or "initial_sha256" not in existing:
        warnings.warn(
            f"{rd.root} was written by an older ctlens: it records no checksums or data "
            "sizes, so a damaged checkpoint or a changed task cannot be detected on resume",
            RunDirWarning, stacklevel=2,
        )
    if old is None:
        return
    new = doc["data"]
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            raise RunConflictError(
                f"{rd.root} holds a run on other data ({key}: {old.get(key)!r} in run.json vs "
                f"{new.get(key)!r} now); resume with the same task options (--task, --n, "
                "--n-train, --seed) or choose another output directory"
            )


def _check_initial(rd: RunDir, model: Any, existing: dict[str, Any]) -> None:
    """Verify the start weights; restore them from ``model`` when it is the start model."""
    recorded = existing.get("initial_sha256")
    if recorded is None:
        try:
            W.check_weights(model, rd.initial_weights)
        except W.CheckpointMismatchError:
            raise
        except _DAMAGE as err:
            raise RunConflictError(
                f"{rd.initial_weights} is damaged ({type(err).__name__}) and this older run "
                "records no checksum to restore it by; start again with --overwrite or "
                "another --out"
            ) from None
        return
    if rd.initial_weights.is_file() and sha256_file(rd.initial_weights) == recorded:
        return
    tmp = rd.checkpoints / ".initial.tmp.safetensors"
    with rd.writing("the start weights", "the checkpoints are unchanged"):
        try:
            W.save_weights(model, tmp)
            if sha256_file(tmp) != recorded:
                raise RunConflictError(
                    f"{rd.initial_weights} is damaged (it does not match the sha256 in "
                    "run.json) and the model given is not the run's start model, so it "
                    "cannot be restored; start again with --overwrite or another --out"
                )
            tmp.replace(rd.initial_weights)
        finally:
            tmp.unlink(missing_ok=True)
    warnings.warn(f"{rd.initial_weights} was damaged; restored it from the given model "
                  "(the run's start model, by its sha256)", RunDirWarning, stacklevel=2)


def fixed_circuit_record(circuit: Circuit | None) -> dict[str, Any]:
    """``run.json``'s record of a run's fixed circuit (none without one): its size and a
    fingerprint of its edges, which `same_run` compares."""
    if circuit is None:
        return {}
    digest = hashlib.sha256(circuit.mask.numpy().tobytes()).hexdigest()
    return {"fixed_circuit": {"n_edges": circuit.n_edges, "sha256": digest}}


def same_run(old: dict[str, Any], new: dict[str, Any], config: TuneConfig) -> bool:
    """Whether ``run.json`` ``old`` describes the run ``new`` (with ``config``) resumes."""
    if old.get("model") != new["model"] or old.get("task") != new["task"]:
        return False
    if old.get("graph") != new["graph"] or old.get("fixed_circuit") != new.get("fixed_circuit"):
        return False
    try:
        old_cfg = TuneConfig.from_dict(old.get("config", {}))
    except (TypeError, ValueError):
        return False
    return old_cfg.semantic_dict() == config.semantic_dict()


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short description of how two run descriptions differ."""
    parts = []
    for key in ("model", "task", "graph", "fixed_circuit"):
        if old.get(key) != new.get(key):
            parts.append(f"{key}: {old.get(key)!r} vs {new.get(key)!r}")
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key) and key not in OPERATIONAL_FIELDS:
            parts.append(f"{key}: {old_cfg.get(key)!r} vs {new_cfg.get(key)!r}")
    return "; ".join(parts[:4]) or "unreadable config"


def _steps_note(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why ``steps`` cannot be raised on an existing run (when that is the difference)."""
    if old.get("config", {}).get("steps") == new["config"]["steps"]:
        return ""
    return ("a run's steps cannot be changed, because its learning-rate and top-N schedules "
            "depend on them (a longer run is a new run); ")


def initial_snapshot(rd: RunDir, model: Any) -> list[torch.Tensor]:
    """Real parameters at the start of the run (read from the run directory)."""
    current = W.unique_state_dict(model)
    saved = {k: v.clone() for k, v in current.items()}
    try:
        W.load_weights(model, rd.initial_weights)
        return W.snapshot(model)
    finally:
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(saved[k])


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(rd: RunDir, model: Any, state: CheckpointState, keep: int) -> None:
    """Write checkpoint ``state.step`` atomically (rank 0 only); a failed write leaves the
    previous checkpoints as they were and no temporary directory behind."""
    steps = rd.checkpoint_steps()
    kept = f"the last good checkpoint (step {steps[-1]}) is kept" if steps else \
        "the start weights are kept"
    with rd.writing(f"the checkpoint of step {state.step}", kept):
        tmp = rd.new_checkpoint_tmp()
        try:
            W.save_weights(model, tmp / F.WEIGHTS)
            if state.circuit is not None:
                state.circuit.save(tmp / F.CIRCUIT)
            save_torch(state_dict(state), tmp / F.STATE)
            rd.commit_checkpoint(tmp, state.step, keep)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(
    rd: RunDir, step: int, model: Any, graph: Graph, model_name: str, config: TuneConfig
) -> CheckpointState:
    """Load checkpoint ``step``'s weights into ``model`` and return its state (a collective
    for a DCP checkpoint under torch.distributed: every rank calls it)."""
    path = rd.checkpoint_dir(step)
    if S.is_dcp(path):
        S.load_dcp_weights(model, path)
    else:
        W.load_weights(model, path / F.WEIGHTS)
    saved = load_torch(path / F.STATE)
    circuit = None
    if saved["circuit_mask"] is not None:
        circuit = Circuit(graph, saved["circuit_mask"], saved["circuit_scores"],
                          json.loads(saved["circuit_metadata"]), model_name)
    return CheckpointState(
        step=step, wall_time=float(saved["wall_time"]), optimizer=saved["optimizer"],
        scheduler=saved["scheduler"], torch_rng=saved["torch_rng"], ema=saved["ema"],
        means=saved["means"], last_loss=saved["last_loss"], circuit=circuit,
        lora=saved["lora"], config=config, scaler=saved.get("scaler"),
    )


def export_model(rd: RunDir, model: Any, lora: Any) -> Path:
    """Export the tuned model as a plain HF directory ``RUN/model`` (LoRA: merged)."""
    if lora is not None:
        lora.mirror()
    with rd.writing("the exported model", "the final checkpoint is kept"):
        return W.export_hf(model, rd.model)
