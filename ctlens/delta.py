"""Sparse export: a tuned model as the slices that changed, applied back to its base.

Circuit-tuning moves few parameters (whole heads' W_Q/W_K/W_V/W_O slices, some MLPs), so
the change is small even when the model is not. `save_delta` compares base and tuned
weights (HF names, as `ctlens.tuning.weights.hf_state_dict` gives them) and writes a
directory holding:

- ``delta.safetensors``: for every changed tensor, the tuned values of its changed slices,
  concatenated along the slicing axis (key: the tensor's HF name); its metadata holds the
  SHA-256 of the manifest (without ``delta_sha256``), so an edited manifest is caught;
- ``manifest.json`` (`ctlens.delta_manifest`): format and version, which slices (per
  tensor: axis and index ranges), shapes and dtypes, the SHA-256 of ``delta.safetensors``,
  of every base tensor and (for a base read from files) of every base weights file.

`apply_delta` checks all of it before it changes or writes anything: the delta's own file
(a flipped byte or a cut is refused), the manifest's structure and binding, the base's
weights files (a missing, extra or changed shard is named), every base tensor (a missing or
extra one is named) and every changed slice. The values are the tuned values themselves,
not differences, so base + delta reproduces the tuned weights bit for bit. A tensor is
sliced along the axis (rows or columns for a matrix, entries for a vector) that stores
fewest values; one whose slices would not be smaller is stored whole.

Output directories follow `ctlens.outputs` (the rule ``ctlens tune`` follows too): a new or
empty directory or a previous output of the same kind is written; files the command did not
write are never deleted or replaced; ``overwrite`` writes beside them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ctlens import delta_manifest as M
from ctlens.delta_manifest import (
    APPLIED,
    FORMAT,
    MANIFEST,
    VERSION,
    WEIGHTS,
    DeltaFileError,
    DeltaMismatchError,
    read_manifest,
)
from ctlens.files import (
    WEIGHTS_INDEX,
    read_safetensors,
    require_dir,
    safetensors_header,
    weight_files,
)
from ctlens.outputs import (
    OutputConflictError,
    OutputKind,
    OutputPlan,
    check_output_dir,
    publish,
    staging_dir,
)

__all__ = [
    "APPLIED", "FORMAT", "MANIFEST", "VERSION", "WEIGHTS", "DeltaFileError", "DeltaInfo",
    "DeltaMismatchError", "DeltaOutputError", "apply_delta", "check_out_dir", "read_manifest",
    "save_delta", "weights_of", "write_weights",
]

State = Mapping[str, torch.Tensor]
MODEL_WEIGHTS = "model.safetensors"

DeltaOutputError = OutputConflictError
"""``out_dir`` is refused (`ctlens.outputs.check_output_dir`; the message says why)."""


def _own_delta(path: Path) -> set[str]:
    """The entries of ``path`` that a delta wrote (each recognised by its content)."""
    own = set()
    if M.is_delta_manifest(path / MANIFEST):
        own.add(MANIFEST)
    if _marker(path / WEIGHTS).get("format") == FORMAT:
        own.add(WEIGHTS)
    return own


def _own_applied(path: Path) -> set[str]:
    """The entries of ``path`` that `write_weights` wrote: its weights (marked) and the
    files those list as copied with them."""
    marker = _marker(path / MODEL_WEIGHTS)
    if marker.get("ctlens") != APPLIED:
        return set()
    try:
        copied = json.loads(marker.get("files", "[]"))
    except ValueError:
        copied = []
    return {MODEL_WEIGHTS, *(n for n in copied if isinstance(n, str) and (path / n).is_file())}


def _marker(path: Path) -> dict[str, str]:
    try:
        return safetensors_header(path) if path.is_file() else {}
    except ValueError:
        return {}


DELTA_OUTPUT = OutputKind("ctlens delta", _own_delta)
MODEL_OUTPUT = OutputKind("model directory written by apply-delta", _own_applied)


def check_out_dir(
    out_dir: str | Path,
    kind: Literal["delta", "model"],
    inputs: tuple[Any, ...] = (),
    overwrite: bool = False,
) -> OutputPlan:
    """Check, before any work, that ``out_dir`` may receive a delta or an applied model.

    The rule is `ctlens.outputs.check_output_dir`'s. For ``"model"`` the first input is the
    base directory, whose files the output copies (so they are names it writes).

    Raises:
        DeltaOutputError: the message says what is there and how to proceed.
    """
    if kind == "delta":
        return check_output_dir(out_dir, DELTA_OUTPUT, {WEIGHTS, MANIFEST}, inputs, overwrite)
    base = Path(inputs[0]) if inputs and isinstance(inputs[0], (str, Path)) else None
    writes = {MODEL_WEIGHTS, *(p.name for p in _copied_files(base))} if base else {
        MODEL_WEIGHTS}
    return check_output_dir(out_dir, MODEL_OUTPUT, writes, inputs, overwrite)


@dataclass(frozen=True)
class DeltaInfo:
    """What `save_delta` wrote: paths, sizes and counts."""

    path: Path
    bytes: int  # size of delta.safetensors + manifest.json
    changed_tensors: int
    changed_values: int  # stored entries (the changed slices)
    total_values: int  # entries of the whole model


# ---------------------------------------------------------------------- reading weights


def weights_of(source: Any) -> dict[str, torch.Tensor]:
    """HF-named weights of a bridge, an HF module, a mapping, a safetensors file or HF dir.

    Tied duplicates are dropped (one name per storage). Tensors of a model are its own, not
    copies; files are read onto the CPU, every shard of a directory checked against its
    index (`weight_files`).
    """
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, torch.nn.Module):
        from ctlens.tuning.weights import unique_state_dict

        return {k: v.detach() for k, v in unique_state_dict(source).items()}
    if isinstance(source, (str, Path)):
        out: dict[str, torch.Tensor] = {}
        for file in weight_files(Path(source)):
            tensors = read_safetensors(file)
            repeated = sorted(set(out) & set(tensors))
            if repeated:
                raise ValueError(f"{file} repeats the tensor {repeated[0]!r} of another "
                                 "weights file in its directory; remove the stray file")
            out.update(tensors)
        return out
    raise TypeError(
        "weights come from a model, a {name: tensor} mapping, a .safetensors file or an HF "
        f"model directory; got {type(source).__name__}"
    )


def _copied_files(base: Path) -> list[Path]:
    """The files of a base directory that an applied model copies (all but its weights)."""
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_file() and p.suffix != ".safetensors"
                  and p.name != WEIGHTS_INDEX)


# ---------------------------------------------------------------------- slicing


def _ranges(index: torch.Tensor) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` runs."""
    runs: list[list[int]] = []
    for i in index.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _slices(base: torch.Tensor, tuned: torch.Tensor) -> tuple[int | None, list[list[int]]]:
    """The cheapest axis and index runs covering every changed entry (axis None: whole)."""
    changed = base != tuned
    if tuned.ndim == 0:
        return None, []
    best: tuple[int, int | None, torch.Tensor | None] = (tuned.numel(), None, None)
    for axis in range(tuned.ndim):
        other = [d for d in range(tuned.ndim) if d != axis]
        hit = changed.any(dim=other) if other else changed
        index = hit.nonzero()[:, 0]
        cost = int(index.numel()) * (tuned.numel() // tuned.shape[axis])
        if cost < best[0]:
            best = (cost, axis, index)
    _, axis, index = best
    return (None, []) if axis is None or index is None else (axis, _ranges(index))


# ---------------------------------------------------------------------- save


def save_delta(base: Any, tuned: Any, out_dir: str | Path, overwrite: bool = False) -> DeltaInfo:
    """Write the change from ``base`` to ``tuned`` weights as a delta directory.

    Args:
        base: the weights before tuning (model, mapping, safetensors file or HF directory).
        tuned: the weights after tuning, in the same layout.
        out_dir: the directory to write: new, empty or a previous delta (replaced only
            once the new one is complete); one holding other files only with ``overwrite``.
        overwrite: write beside files the command did not write (they are kept).

    Raises:
        DeltaOutputError: ``out_dir`` is refused (`check_out_dir`), before any reading.
        ValueError: the two do not have the same tensor names, shapes and dtypes.
    """
    from safetensors.torch import save_file

    plan = check_out_dir(out_dir, "delta", (base, tuned), overwrite)
    old, new = weights_of(base), weights_of(tuned)
    if set(old) != set(new):
        only = sorted(set(old) ^ set(new))[:5]
        raise ValueError(f"base and tuned weights hold different tensors (e.g. {only})")
    values: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for name in sorted(new):
        a, b = old[name].detach().cpu(), new[name].detach().cpu()
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"{name}: base {a.dtype} {tuple(a.shape)} vs tuned "
                             f"{b.dtype} {tuple(b.shape)}; a delta needs the same layout")
        if torch.equal(a, b):
            continue
        axis, runs = _slices(a, b)
        part = b if axis is None else b.index_select(axis, M.run_index(runs))
        values[name] = part.contiguous()
        entries[name] = {"shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch."),
                         "axis": axis, "ranges": runs}
    manifest = {
        "format": FORMAT, "version": VERSION,
        "changed": entries,
        "base_sha256": {k: M.tensor_digest(v) for k, v in sorted(old.items())},
        "base_files": M.file_digests(
            weight_files(Path(base)) if isinstance(base, (str, Path)) else None),
        "total_values": sum(v.numel() for v in new.values()),
        "stored_values": sum(v.numel() for v in values.values()),
    }
    tmp = staging_dir(plan.path)
    try:
        save_file(values, str(tmp / WEIGHTS),
                  metadata={"format": FORMAT, "manifest_sha256": M.manifest_digest(manifest)})
        manifest["delta_sha256"] = M.sha256_file(tmp / WEIGHTS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        publish(tmp, plan, order=(MANIFEST, WEIGHTS))  # a torn pair fails delta_sha256
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    out = plan.path
    size = sum(f.stat().st_size for f in (out / WEIGHTS, out / MANIFEST))
    return DeltaInfo(out, size, len(entries), manifest["stored_values"],
                     manifest["total_values"])


# ---------------------------------------------------------------------- apply


def apply_delta(base: Any, delta_dir: str | Path, check: bool = True) -> dict[str, torch.Tensor]:
    """Apply a delta to ``base``; returns the tuned weights (HF names).

    A model's own tensors are updated in place (the model becomes the tuned model); a
    mapping, file or directory is read and the result returned (write it with
    `write_weights` or ``ctlens apply-delta``). Everything is checked before anything
    changes (module docstring).

    Raises:
        DeltaFileError: the delta directory is damaged, edited or not a delta.
        DeltaMismatchError: the base is not the one the delta was made from: a weights file
            missing, extra or changed, a tensor missing or extra, or (with ``check``) a
            tensor's values differ. Nothing is modified then.
    """
    manifest = read_manifest(delta_dir)
    if isinstance(base, (str, Path)):
        M.check_base_files(Path(base), manifest, weight_files)
    weights = weights_of(base)
    M.check_base_tensors(weights, manifest, check)
    values = M.read_values(Path(delta_dir), manifest)
    in_place = isinstance(base, torch.nn.Module)
    out = dict(weights)
    for name, entry in manifest["changed"].items():
        target = weights[name] if in_place else weights[name].clone()
        part = values[name].to(device=target.device, dtype=target.dtype)
        with torch.no_grad():
            if entry["axis"] is None:
                target.copy_(part)
            else:
                index = M.run_index(entry["ranges"]).to(target.device)
                target.index_copy_(entry["axis"], index, part)
        out[name] = target
    return out


def write_weights(
    base_dir: str | Path, delta_dir: str | Path, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write the HF model directory ``base_dir`` with the delta applied to ``out_dir``.

    Every file of ``base_dir`` is copied except its ``*.safetensors`` weights and their
    index, which become one ``model.safetensors`` holding the tuned weights (marked as this
    function's output, with the names of the files copied beside it). ``out_dir`` must be
    new, empty or a previous output of this function; one holding other files only with
    ``overwrite``, which writes beside them (`check_out_dir`, before any reading). Nothing
    is written unless every check of `apply_delta` passes; a new or previous output is
    replaced atomically.
    """
    from safetensors.torch import save_file

    plan = check_out_dir(out_dir, "model", (base_dir, delta_dir), overwrite)
    read_manifest(delta_dir)  # the delta is named first when both are wrong
    base = require_dir(base_dir, "the base model directory",
                       "apply-delta writes an HF model directory from a base directory")
    tuned = apply_delta(base, delta_dir)
    copied = _copied_files(base)
    tmp = staging_dir(plan.path)
    try:
        for item in copied:
            shutil.copy2(item, tmp / item.name)
        names = json.dumps([p.name for p in copied])
        save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp / MODEL_WEIGHTS),
                  metadata={"format": "pt", "ctlens": APPLIED, "files": names})
        publish(tmp, plan, order=(MODEL_WEIGHTS, *(p.name for p in copied)))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return plan.path
