"""Deltas never lose a user's file and never apply silently wrong (issue 26).

Each case was found by a catalogue of bad inputs run against the previous version: an
``--out`` that holds the inputs, ``--overwrite`` deleting a user's files, a delta with
flipped bytes, a base with a shard missing, temporaries left by a killed write, and
damaged or edited delta files. Every test goes through the real command line where a user
would, and checks that nothing was written or deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctlens.cli import main
from ctlens.delta import apply_delta, save_delta, weights_of, write_weights

ROOT = Path(__file__).resolve().parent.parent
# child processes import the same ctlens as this one (the checkout under test)
PYTHONPATH = os.pathsep.join(p for p in sys.path if p and Path(p, "ctlens").is_dir())


def _weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    base = {f"layer{i}.{kind}": torch.randn(8, 6, generator=gen)
            for i in range(4) for kind in ("weight", "bias")}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["layer0.weight"][2:4] += 1.0
    tuned["layer3.bias"][:, 1] -= 0.5
    return base, tuned


def _model_dir(path: Path, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """An HF-like model directory: config.json and weights (with an index when sharded)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "toy"}')
    names = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, str(path / file))
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _fails(capsys: pytest.CaptureFixture, args: list[str], *needles: str) -> str:
    """``ctlens ARGS`` exits 2 with one line holding every needle."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ctlens "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture()
def models(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``tmp/work`` holding base/ and tuned/ (sharded in two) and the user's notes."""
    base, tuned = _weights()
    work = tmp_path / "work"
    _model_dir(work / "base", base, shards=2)
    _model_dir(work / "tuned", tuned, shards=2)
    (work / "notes.txt").write_text("mine")
    return work, work / "base", work / "tuned"


# ---------------------------------------------------------------------- data loss


def test_out_holding_or_inside_an_input_is_refused_even_with_overwrite(
    models: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    work, base, tuned = models
    before = _snapshot(work)
    for out in (work, tmp_path):  # holds both inputs
        _fails(capsys, ["make-delta", str(base), str(tuned), "--out", str(out), "--overwrite"],
               "holds the input")
    _fails(capsys, ["make-delta", str(base), str(tuned), "--out", str(base / "d"),
                    "--overwrite"], "lies inside the input")
    assert main(["make-delta", str(base), str(tuned), "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    for out in (work, base / "applied", tmp_path / "d" / "x"):
        _fails(capsys, ["apply-delta", str(base), str(tmp_path / "d"), "--out", str(out),
                        "--overwrite"], "the input")
    assert _snapshot(work) == before


def test_overwrite_writes_beside_the_users_files_and_never_replaces_them(
    models: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    """The rule tune follows: --overwrite never deletes or replaces a file the command did
    not write; a previous output of the same kind is replaced."""
    _, base, tuned = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\0" * 10)
    args = ["make-delta", str(base), str(tuned), "--out", str(out)]
    _fails(capsys, args, "not empty", "--overwrite")
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--overwrite"]) == 0  # its own delta is replaced, the rest kept
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [
        "delta.safetensors", "manifest.json", "notes.txt", "sub"]
    assert (out / "notes.txt").read_text() == "keep"
    assert (out / "sub" / "data.bin").read_bytes() == b"\0" * 10

    # a user's file under a name the delta writes: refused, even with --overwrite
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "manifest.json").write_text('{"mine": true}')
    _fails(capsys, ["make-delta", str(base), str(tuned), "--out", str(clash), "--overwrite"],
           "manifest.json that no ctlens delta wrote", "never deletes")
    assert (clash / "manifest.json").read_text() == '{"mine": true}'

    # apply-delta: the same rule; the user's config.json is not replaced by the base's
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("user's")
    _fails(capsys, ["apply-delta", str(base), str(out), "--out", str(model), "--overwrite"],
           "config.json that no model directory written by apply-delta wrote")
    assert (model / "config.json").read_text() == "user's"
    (model / "config.json").unlink()
    (model / "README").write_text("user's")
    for _ in range(2):  # the second time, its own earlier output is replaced
        assert main(["apply-delta", str(base), str(out), "--out", str(model),
                     "--overwrite"]) == 0
    assert (model / "README").read_text() == "user's"
    assert sorted(p.name for p in model.iterdir()) == ["README", "config.json",
                                                       "model.safetensors"]


# ---------------------------------------------------------------------- silent wrong results


def test_flipped_or_cut_delta_is_refused_before_anything_is_written(
    models: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    _, base, tuned = models
    delta = tmp_path / "d"
    assert main(["make-delta", str(base), str(tuned), "--out", str(delta)]) == 0
    capsys.readouterr()
    good = (delta / "delta.safetensors").read_bytes()
    flipped = bytearray(good)
    for i in range(8):  # 8 bytes inside the stored values
        flipped[len(good) - 1 - 13 * i] ^= 0xFF
    for damaged in (bytes(flipped), good[: len(good) // 2]):
        (delta / "delta.safetensors").write_bytes(damaged)
        _fails(capsys, ["apply-delta", str(base), str(delta), "--out", str(tmp_path / "o")],
               "delta.safetensors does not match the SHA-256")
        assert not (tmp_path / "o").exists()
        with pytest.raises(ValueError, match="does not match the SHA-256"):
            apply_delta(weights_of(base), delta)


def test_base_with_a_shard_missing_or_extra_is_refused_naming_it(
    models: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    _, base, tuned = models
    delta = tmp_path / "d"
    assert main(["make-delta", str(base), str(tuned), "--out", str(delta)]) == 0
    capsys.readouterr()
    second = base / "model-00002-of-00002.safetensors"
    kept = second.read_bytes()
    second.unlink()  # an interrupted download: the index still lists it
    _fails(capsys, ["apply-delta", str(base), str(delta), "--out", str(tmp_path / "o")],
           "model-00002-of-00002.safetensors")
    _fails(capsys, ["make-delta", str(base), str(tuned), "--out", str(tmp_path / "d2")],
           "lacks model-00002-of-00002.safetensors")
    # without the index too: the delta records every base file
    index = base / "model.safetensors.index.json"
    index.rename(tmp_path / "index")
    _fails(capsys, ["apply-delta", str(base), str(delta), "--out", str(tmp_path / "o")],
           "lacks model-00002-of-00002.safetensors")
    second.write_bytes(kept)
    save_file({"stray": torch.zeros(2)}, str(base / "model-extra.safetensors"))
    _fails(capsys, ["apply-delta", str(base), str(delta), "--out", str(tmp_path / "o")],
           "model-extra.safetensors")
    assert not (tmp_path / "o").exists() and not (tmp_path / "d2").exists()
    # a base mapping missing a tensor (a delta made from tensors, not files)
    base_state, tuned_state = _weights()
    save_delta(base_state, tuned_state, tmp_path / "d3")
    del base_state["layer2.bias"]
    with pytest.raises(ValueError, match="no tensor 'layer2.bias'"):
        apply_delta(base_state, tmp_path / "d3")


# ---------------------------------------------------------------------- damaged files


def _rewrite(delta: Path, manifest: dict, values: dict[str, torch.Tensor]) -> None:
    """Write a delta whose checksums are consistent with what it holds (a forged one)."""
    from ctlens.delta_manifest import manifest_digest, sha256_file

    manifest = {k: v for k, v in manifest.items() if k != "delta_sha256"}
    save_file(values, str(delta / "delta.safetensors"),
              metadata={"format": "ctlens-delta", "manifest_sha256": manifest_digest(manifest)})
    manifest["delta_sha256"] = sha256_file(delta / "delta.safetensors")
    (delta / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["garbage", "list", "edited-range", "edited-base",
                                    "no-changed", "missing-tensor", "bad-range"])
def test_damaged_delta_files_are_one_line_naming_the_file(
    damage: str, models: tuple[Path, Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    _, base, tuned = models
    delta = tmp_path / "d"
    assert main(["make-delta", str(base), str(tuned), "--out", str(delta)]) == 0
    capsys.readouterr()
    path = delta / "manifest.json"
    manifest = json.loads(path.read_text())
    values = load_file(str(delta / "delta.safetensors"))
    name = "layer0.weight"
    if damage == "garbage":
        path.write_text("{not json")
        expect = "manifest.json is not valid JSON"
    elif damage == "list":
        path.write_text("[1, 2]")
        expect = "expected a JSON object"
    elif damage == "edited-range":
        manifest["changed"][name]["ranges"] = [[3, 5]]
        path.write_text(json.dumps(manifest))
        expect = "manifest.json was edited"
    elif damage == "edited-base":
        manifest["base_sha256"][name] = "0" * 64
        path.write_text(json.dumps(manifest))
        expect = "manifest.json was edited"
    elif damage == "no-changed":
        del manifest["changed"]
        path.write_text(json.dumps(manifest))
        expect = "has no 'changed'"
    elif damage == "missing-tensor":
        del values[name]
        _rewrite(delta, manifest, values)
        expect = f"lacks the tensor '{name}'"
    else:
        manifest["changed"][name]["ranges"] = [[7, 99]]
        _rewrite(delta, manifest, values)
        expect = "malformed (range [7, 99]"
    _fails(capsys, ["apply-delta", str(base), str(delta), "--out", str(tmp_path / "o")], expect)
    assert not (tmp_path / "o").exists()


def test_truncated_base_weights_are_one_line_naming_the_file(
    models: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    _, base, tuned = models
    file = tuned / "model-00001-of-00002.safetensors"
    file.write_bytes(file.read_bytes()[:300])
    _fails(capsys, ["make-delta", str(base), str(tuned), "--out", str(tmp_path / "d")],
           str(file), "truncated or damaged")


# ---------------------------------------------------------------------- killed writes


def test_a_killed_writes_temporaries_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """Real processes die in the middle of save_delta (os._exit while the weights are being
    written: no cleanup runs); the next write to the same place removes what they left,
    but not a live writer's staging directory."""
    base, tuned = _weights()
    out = tmp_path / "d"
    code = (
        "import os, sys, torch, safetensors.torch as st; from ctlens.delta import save_delta; "
        "st.save_file = lambda *a, **k: os._exit(9); "
        "save_delta({'w': torch.zeros(3)}, {'w': torch.ones(3)}, sys.argv[1])"
    )
    env = {**os.environ, "PYTHONPATH": PYTHONPATH or str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code, str(out)], env=env).returncode == 9
    assert len(list(tmp_path.glob(".d.tmp-*"))) == 1 and not out.exists()
    save_delta(base, tuned, out)
    assert not list(tmp_path.glob(".d.tmp-*"))
    assert subprocess.run([sys.executable, "-c", code, str(out)], env=env).returncode == 9
    assert len(list(tmp_path.glob(".d.tmp-*"))) == 1 and (out / "manifest.json").is_file()
    write_weights(_model_dir(tmp_path / "base", base), out, tmp_path / "m")  # another place
    save_delta(base, tuned, out)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    from ctlens.outputs import staging_dir

    mine = staging_dir(out)  # a live writer's (this process): kept
    save_delta(base, tuned, out)
    assert sorted(tmp_path.glob(".d.tmp-*")) == [mine]
