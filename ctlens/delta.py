"""Sparse export: a tuned model as the slices that changed, applied back to its base.

Circuit-tuning moves few parameters (whole heads' W_Q/W_K/W_V/W_O slices, some MLPs), so
the change is small even when the model is not. `save_delta` compares base and tuned
weights (HF names, as `ctlens.tuning.weights.hf_state_dict` gives them) and writes a
directory holding:

- ``delta.safetensors``: for every changed tensor, the tuned values of its changed slices,
  concatenated along the slicing axis (key: the tensor's HF name);
- ``manifest.json``: format and version, which slices (per tensor: axis and index ranges),
  shapes and dtypes, and the SHA-256 of every base tensor, so that `apply_delta` can refuse
  a different base.

The values are the tuned values themselves, not differences, so base + delta reproduces the
tuned weights bit for bit. A tensor is sliced along the axis (rows or columns for a matrix,
entries for a vector) that stores fewest values; one whose slices would not be smaller is
stored whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ctlens.files import replace_dir

FORMAT = "ctlens-delta"
VERSION = 1
WEIGHTS = "delta.safetensors"
MANIFEST = "manifest.json"
APPLIED = "apply-delta"
"""``model.safetensors`` metadata ``ctlens`` of a directory `write_weights` wrote."""

State = Mapping[str, torch.Tensor]


class DeltaMismatchError(ValueError):
    """The delta does not belong to these base weights (the message says which tensor)."""


class DeltaOutputError(ValueError):
    """``out_dir`` holds something that is not a previous output of the same kind."""


def check_out_dir(
    out_dir: str | Path,
    kind: Literal["delta", "model"],
    inputs: tuple[Any, ...] = (),
    overwrite: bool = False,
) -> Path:
    """Check, before any work, that ``out_dir`` may receive a delta or an applied model.

    Accepted: a missing or empty directory, or a previous output of the same kind (a delta
    directory for ``"delta"``, a directory `write_weights` wrote for ``"model"``), which is
    replaced. Anything else is refused unless ``overwrite``; a file, or one of ``inputs``
    (the paths being read), always.

    Raises:
        DeltaOutputError: the message says what is there and how to proceed.
    """
    out = Path(out_dir)
    what = "delta" if kind == "delta" else "model directory written by apply-delta"
    for item in inputs:
        if isinstance(item, (str, Path)) and Path(item).exists() and (
            out.resolve() == Path(item).resolve()
        ):
            raise DeltaOutputError(f"the output {out} is also an input; write elsewhere")
    if out.exists() and not out.is_dir():
        raise DeltaOutputError(f"the output {out} is a file; give a directory (new, empty, "
                               f"or a previous {what})")
    if not out.is_dir() or overwrite:
        return out
    entries = sorted(p.name for p in out.iterdir())
    previous = _is_delta(out) if kind == "delta" else _is_applied(out)
    if entries and not previous:
        raise DeltaOutputError(
            f"the output {out} is not empty ({len(entries)} entries, e.g. {entries[0]!r}) and "
            f"is not a previous {what}; choose a new directory, or pass overwrite=True "
            "(--overwrite) to replace it and everything in it"
        )
    return out


def _is_delta(path: Path) -> bool:
    """Whether ``path`` holds a ctlens delta and nothing else."""
    names = {p.name for p in path.iterdir()}
    if not names <= {WEIGHTS, MANIFEST} or MANIFEST not in names:
        return False
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_applied(path: Path) -> bool:
    """Whether ``path`` is a model directory `write_weights` wrote (its weights say so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return (f.metadata() or {}).get("ctlens") == APPLIED
    except Exception:  # missing or not safetensors: not ours
        return False


@dataclass(frozen=True)
class DeltaInfo:
    """What `save_delta` wrote: paths, sizes and counts."""

    path: Path
    bytes: int  # size of delta.safetensors + manifest.json
    changed_tensors: int
    changed_values: int  # stored entries (the changed slices)
    total_values: int  # entries of the whole model


def weights_of(source: Any) -> dict[str, torch.Tensor]:
    """HF-named weights of a bridge, an HF module, a mapping, a safetensors file or HF dir.

    Tied duplicates are dropped (one name per storage). Tensors of a model are its own, not
    copies; files are read onto the CPU.
    """
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, torch.nn.Module):
        from ctlens.tuning.weights import unique_state_dict

        return {k: v.detach() for k, v in unique_state_dict(source).items()}
    if isinstance(source, (str, Path)):
        return _read_weights(Path(source))
    raise TypeError(
        "weights come from a model, a {name: tensor} mapping, a .safetensors file or an HF "
        f"model directory; got {type(source).__name__}"
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.is_file() and path.suffix == ".safetensors":
        return load_file(str(path))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"{path} is neither a .safetensors file nor a model directory holding "
            "*.safetensors weights"
        )
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out.update(load_file(str(file)))
    return out


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def _ranges(index: torch.Tensor) -> list[list[int]]:
    """Sorted indices as ``[start, stop)`` runs."""
    runs: list[list[int]] = []
    for i in index.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _index(runs: list[list[int]]) -> torch.Tensor:
    if not runs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(a, b) for a, b in runs])


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


def save_delta(base: Any, tuned: Any, out_dir: str | Path, overwrite: bool = False) -> DeltaInfo:
    """Write the change from ``base`` to ``tuned`` weights as a delta directory, atomically.

    Args:
        base: the weights before tuning (model, mapping, safetensors file or HF directory).
        tuned: the weights after tuning, in the same layout.
        out_dir: the directory to create: new, empty or a previous delta (replaced only
            once the new one is complete); anything else only with ``overwrite``.
        overwrite: replace a non-empty ``out_dir`` that is not a delta, and all it holds.

    Raises:
        DeltaOutputError: ``out_dir`` is refused (`check_out_dir`), before any reading.
        ValueError: the two do not have the same tensor names, shapes and dtypes.
    """
    from safetensors.torch import save_file

    out = check_out_dir(out_dir, "delta", (base, tuned), overwrite)
    old, new = weights_of(base), weights_of(tuned)
    if set(old) != set(new):
        only = sorted(set(old) ^ set(new))[:5]
        raise ValueError(f"base and tuned weights hold different tensors (e.g. {only})")
    values: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    stored = 0
    for name in sorted(new):
        a, b = old[name].detach().cpu(), new[name].detach().cpu()
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"{name}: base {a.dtype} {tuple(a.shape)} vs tuned "
                             f"{b.dtype} {tuple(b.shape)}; a delta needs the same layout")
        if torch.equal(a, b):
            continue
        axis, runs = _slices(a, b)
        part = b if axis is None else b.index_select(axis, _index(runs))
        values[name] = part.contiguous()
        stored += part.numel()
        entries[name] = {"shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch."),
                         "axis": axis, "ranges": runs}
    manifest = {
        "format": FORMAT, "version": VERSION,
        "changed": entries,
        "base_sha256": {k: _digest(v) for k, v in sorted(old.items())},
        "total_values": sum(v.numel() for v in new.values()),
        "stored_values": stored,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(values, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in (out / WEIGHTS, out / MANIFEST))
    return DeltaInfo(out, size, len(entries), stored, manifest["total_values"])



def read_manifest(delta_dir: str | Path) -> dict[str, Any]:
    """The manifest of a delta directory, checked for format and version."""
    path = Path(delta_dir) / MANIFEST
    if not path.is_file() or not (Path(delta_dir) / WEIGHTS).is_file():
        raise FileNotFoundError(f"{delta_dir} is not a ctlens delta (needs {MANIFEST} and "
                                f"{WEIGHTS}; write one with ctlens.delta.save_delta)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = (manifest.get("format"), manifest.get("version"))
        raise ValueError(f"{path} is not a {FORMAT} version {VERSION} manifest (found "
                         f"format {found[0]!r}, version {found[1]!r}); re-create the delta")
    return manifest


def apply_delta(base: Any, delta_dir: str | Path, check: bool = True) -> dict[str, torch.Tensor]:
    """Apply a delta to ``base``; returns the tuned weights (HF names).

    A model's own tensors are updated in place (the model becomes the tuned model); a
    mapping, file or directory is read and the result returned (write it with
    `write_weights` or ``ctlens apply-delta``).

    Raises:
        DeltaMismatchError: (with ``check``) a base tensor differs from the one the delta
            was made from, or a changed tensor is missing or shaped differently. Nothing is
            modified then.
    """
    from safetensors.torch import load_file

    manifest = read_manifest(delta_dir)
    weights = weights_of(base)
    in_place = isinstance(base, torch.nn.Module)
    for name, entry in manifest["changed"].items():
        if name not in weights:
            raise DeltaMismatchError(f"the base has no tensor {name!r}, which the delta changes")
        if list(weights[name].shape) != entry["shape"]:
            raise DeltaMismatchError(f"{name}: base shape {list(weights[name].shape)} vs "
                                     f"{entry['shape']} in the delta")
    if check:
        for name, digest in manifest["base_sha256"].items():
            if name in weights and _digest(weights[name]) != digest:
                raise DeltaMismatchError(
                    f"this delta was made from other base weights: {name} differs; apply it "
                    "to the model it was made from"
                )
    values = load_file(str(Path(delta_dir) / WEIGHTS))
    out = dict(weights)
    for name, entry in manifest["changed"].items():
        target = weights[name] if in_place else weights[name].clone()
        part = values[name].to(device=target.device, dtype=target.dtype)
        with torch.no_grad():
            if entry["axis"] is None:
                target.copy_(part)
            else:
                index = _index(entry["ranges"]).to(target.device)
                target.index_copy_(entry["axis"], index, part)
        out[name] = target
    return out


def write_weights(
    base_dir: str | Path, delta_dir: str | Path, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write the HF model directory ``base_dir`` with the delta applied to ``out_dir``.

    Every file of ``base_dir`` is copied except its ``*.safetensors`` weights, which are
    written as one ``model.safetensors`` holding the tuned weights (marked as this
    function's output). Atomic: ``out_dir`` appears complete or not at all. ``out_dir``
    must be new, empty or a previous output of this function, unless ``overwrite``
    (`check_out_dir`, before any reading).
    """
    from safetensors.torch import save_file

    base = Path(base_dir)
    out = check_out_dir(out_dir, "model", (base, delta_dir), overwrite)
    tuned = apply_delta(base, delta_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for item in base.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != (
                "model.safetensors.index.json"
            ):
                shutil.copy2(item, tmp / item.name)
        save_file({k: v.contiguous() for k, v in tuned.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "ctlens": APPLIED})
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
