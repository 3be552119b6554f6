"""A delta directory's manifest: its format, its checksums, and every check made on reading.

`ctlens.delta` writes and applies deltas; this module is the one spelling of what a delta
directory holds and what may be trusted in it. A manifest (``manifest.json``) is a JSON
object with:

- ``format`` (``"ctlens-delta"``) and ``version`` (`VERSION`);
- ``changed``: per changed tensor, ``shape``, ``dtype``, ``axis`` (None: stored whole) and
  ``ranges`` (sorted ``[start, stop)`` runs along ``axis``);
- ``base_sha256``: the SHA-256 of every base tensor (`tensor_digest`);
- ``base_files``: the SHA-256 of every weights file of the base, by name (None when the base
  was a model or a mapping, not files);
- ``delta_sha256``: the SHA-256 of ``delta.safetensors``, whose metadata in turn holds the
  SHA-256 of the manifest without this field (`manifest_digest`): each file vouches for
  the other, so a flipped byte, a cut or an edit in either is refused.

Reading (`read_manifest`, `check_base_files`, `check_base_tensors`, `read_values`) refuses
anything that does not check out with one line naming the file, the field or the tensor and
what to do, before any weight is changed or written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ctlens.files import describe_path, read_safetensors, safetensors_header, sha256_file

FORMAT = "ctlens-delta"
VERSION = 2
WEIGHTS = "delta.safetensors"
MANIFEST = "manifest.json"
APPLIED = "apply-delta"
"""``model.safetensors`` metadata ``ctlens`` of a directory `ctlens.delta.write_weights` wrote."""

_REDO = "re-create the delta with ctlens make-delta"


class DeltaFileError(ValueError):
    """The delta directory is not a delta, or its files are damaged or edited."""


class DeltaMismatchError(ValueError):
    """The delta does not belong to these base weights (the message says which file or
    tensor)."""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).hexdigest()


def file_digests(files: list[Path] | None) -> dict[str, str] | None:
    """``{file name: SHA-256}`` of a base's weights files (None for a model or mapping)."""
    return None if files is None else {f.name: sha256_file(f) for f in files}


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest without ``delta_sha256`` (stored in the delta's metadata)."""
    body = {k: v for k, v in manifest.items() if k != "delta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def run_index(runs: list[list[int]]) -> torch.Tensor:
    """The indices of ``[start, stop)`` runs, concatenated."""
    if not runs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(a, b) for a, b in runs])


def is_delta_manifest(path: Path) -> bool:
    """Whether ``path`` is a delta manifest (by its ``format``; any version)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


# ---------------------------------------------------------------------- reading


def read_manifest(delta_dir: str | Path) -> dict[str, Any]:
    """The manifest of a delta directory, once the directory checks out as a whole.

    Checked in order: both files exist; the manifest is a JSON object of this format and
    version with fields of the right types; ``delta.safetensors`` has the recorded SHA-256
    (not flipped, cut or swapped); the manifest is the one the delta was written with (not
    edited); every changed entry is well formed.

    Raises:
        DeltaFileError: one line naming the file and what is wrong.
    """
    folder = Path(delta_dir)
    if not folder.is_dir():
        error = NotADirectoryError if folder.exists() else FileNotFoundError
        raise error(f"{folder} is not a ctlens delta: it is {describe_path(folder)}; a delta is "
                    "a directory written by ctlens make-delta")
    path, weights = folder / MANIFEST, folder / WEIGHTS
    if not path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a ctlens delta (needs {MANIFEST} and "
                                f"{WEIGHTS}; write one with ctlens make-delta)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DeltaFileError(f"{path} is not valid JSON ({err}); the manifest is damaged: "
                             f"{_REDO}") from None
    _check_fields(manifest, path)
    if sha256_file(weights) != manifest["delta_sha256"]:
        raise DeltaFileError(
            f"{weights} does not match the SHA-256 in {MANIFEST}: it is truncated, damaged or "
            f"from another delta; {_REDO}"
        )
    if safetensors_header(weights).get("manifest_sha256") != manifest_digest(manifest):
        raise DeltaFileError(
            f"{path} was edited after the delta was written (it no longer matches the "
            f"checksum recorded in {WEIGHTS}); restore it or {_REDO}"
        )
    for name, entry in manifest["changed"].items():
        _check_entry(name, entry, path)
    return manifest


def _check_fields(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise DeltaFileError(f"{path}: expected a JSON object, got {type(manifest).__name__}; "
                             f"not a ctlens delta manifest")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = (manifest.get("format"), manifest.get("version"))
        raise DeltaFileError(f"{path} is not a {FORMAT} version {VERSION} manifest (found "
                             f"format {found[0]!r}, version {found[1]!r}); {_REDO}")
    kinds: dict[str, tuple[type, ...]] = {
        "changed": (dict,), "base_sha256": (dict,), "base_files": (dict, type(None)),
        "delta_sha256": (str,),
    }
    for key, allowed in kinds.items():
        if key not in manifest:
            raise DeltaFileError(f"{path} has no {key!r}; the manifest is damaged: {_REDO}")
        if not isinstance(manifest[key], allowed):
            raise DeltaFileError(f"{path}: {key!r} is {type(manifest[key]).__name__}, not "
                                 f"{' or '.join(a.__name__ for a in allowed)}; {_REDO}")


def _check_entry(name: str, entry: Any, path: Path) -> None:
    """Refuse a ``changed`` entry whose shape, dtype, axis or ranges are malformed."""

    def bad(what: str) -> DeltaFileError:
        return DeltaFileError(f"{path}: the entry of {name!r} is malformed ({what}); {_REDO}")

    if not isinstance(entry, dict):
        raise bad("not an object")
    shape, axis, runs = entry.get("shape"), entry.get("axis"), entry.get("ranges")
    if not isinstance(shape, list) or not all(_count(n) for n in shape):
        raise bad(f"shape {shape!r}")
    if not isinstance(getattr(torch, str(entry.get("dtype")), None), torch.dtype):
        raise bad(f"dtype {entry.get('dtype')!r}")
    if axis is not None and not (_count(axis) and axis < len(shape)):
        raise bad(f"axis {axis!r} of a {len(shape)}-d tensor")
    if not isinstance(runs, list) or (axis is None and runs):
        raise bad(f"ranges {runs!r:.60}")
    stop = 0
    for run in runs:
        ok = isinstance(run, list) and len(run) == 2 and all(_count(i) for i in run)
        if not ok or not stop <= run[0] < run[1] <= shape[axis]:
            raise bad(f"range {run!r:.40} along axis {axis} of size "
                      f"{shape[axis] if axis is not None else '?'}")
        stop = run[1]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_base_files(base: Path, manifest: Mapping[str, Any],
                     weight_files: Callable[[Path], list[Path]]) -> None:
    """Refuse a base whose weights files are not those the delta was made from.

    A missing file (an interrupted download) or an extra one is named, and so is one whose
    SHA-256 differs. A base given as one file is compared by content whatever its name.
    """
    recorded: dict[str, str] | None = manifest["base_files"]
    if recorded is None:
        return  # made from a model or a mapping: the tensors are checked one by one
    files = weight_files(base)
    if len(files) == 1 and len(recorded) == 1 and base.is_file():
        files_by_name = {next(iter(recorded)): files[0]}
    else:
        files_by_name = {f.name: f for f in files}
    missing = sorted(set(recorded) - set(files_by_name))
    if missing:
        raise DeltaMismatchError(
            f"the base {base} lacks {missing[0]}, one of the {len(recorded)} weights files the "
            "delta was made from (an interrupted download?); copy or download it again"
        )
    extra = sorted(set(files_by_name) - set(recorded))
    if extra:
        raise DeltaMismatchError(
            f"the base {base} holds {extra[0]}, which the base the delta was made from did "
            "not; apply it to the model it was made from"
        )
    for name, digest in sorted(recorded.items()):
        if sha256_file(files_by_name[name]) != digest:
            raise DeltaMismatchError(
                f"this delta was made from other base weights: {files_by_name[name]} differs "
                "from the file it was made from; apply it to the model it was made from"
            )


def check_base_tensors(weights: Mapping[str, torch.Tensor], manifest: Mapping[str, Any],
                       check: bool = True) -> None:
    """Refuse base weights that are not those the delta was made from: a missing or extra
    tensor, a changed tensor of another shape, or (``check``) any tensor's values."""
    recorded: dict[str, str] = manifest["base_sha256"]
    missing = sorted(set(recorded) - set(weights))
    if missing:
        raise DeltaMismatchError(
            f"the base has no tensor {missing[0]!r} ({len(missing)} of the {len(recorded)} "
            "tensors the delta was made from are missing); apply it to the complete model "
            "it was made from"
        )
    extra = sorted(set(weights) - set(recorded))
    if extra:
        raise DeltaMismatchError(
            f"the base holds the tensor {extra[0]!r}, which the model the delta was made "
            "from did not; apply it to the model it was made from"
        )
    for name, entry in manifest["changed"].items():
        if name not in weights:
            raise DeltaMismatchError(f"the base has no tensor {name!r}, which the delta changes")
        if list(weights[name].shape) != entry["shape"]:
            raise DeltaMismatchError(f"{name}: base shape {list(weights[name].shape)} vs "
                                     f"{entry['shape']} in the delta")
    if check:
        for name, digest in recorded.items():
            if tensor_digest(weights[name]) != digest:
                raise DeltaMismatchError(
                    f"this delta was made from other base weights: {name} differs; apply it "
                    "to the model it was made from"
                )


def read_values(delta_dir: Path, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The stored slices, each checked against its manifest entry (name, shape, dtype)."""
    path = delta_dir / WEIGHTS
    values = read_safetensors(path)
    for name, entry in manifest["changed"].items():
        if name not in values:
            raise DeltaFileError(f"{path} lacks the tensor {name!r} that {MANIFEST} lists; the "
                                 f"delta is damaged: {_REDO}")
        shape = list(entry["shape"])
        if entry["axis"] is not None:
            shape[entry["axis"]] = sum(b - a for a, b in entry["ranges"])
        dtype = str(values[name].dtype).removeprefix("torch.")
        if list(values[name].shape) != shape or dtype != entry["dtype"]:
            raise DeltaFileError(
                f"{path}: {name!r} is {dtype} {list(values[name].shape)} but {MANIFEST} says "
                f"{entry['dtype']} {shape}; the delta is damaged: {_REDO}"
            )
    extra = sorted(set(values) - set(manifest["changed"]))
    if extra:
        raise DeltaFileError(f"{path} holds {extra[0]!r}, which {MANIFEST} does not list; "
                             f"{_REDO}")
    return values
