"""Run-directory safety (issue 16): damaged checkpoints, changed data, user files, full disks."""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path

import pytest
import torch
from tuning_toy import tiny_model, toy_task

import ctlens
import ctlens.model
import ctlens.tasks.bundle
from ctlens.tuning import RunConflictError, TuneConfig
from ctlens.tuning import rundir as R
from ctlens.tuning import weights as W
from ctlens.tuning.checkpoints import RunDirWarning
from ctlens.tuning.runner import CircuitTuner

CFG = TuneConfig(mode="gradient", top_n=30, steps=4, batch_size=6, lr=1e-2, eval_every=2,
                 save_every=2, eval_examples=6, ema=0.3, export=False, progress=False)


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor]]:
    """A finished run (checkpoints at steps 2 and 4) and its final weights."""
    root = tmp_path_factory.mktemp("finished") / "run"
    model = tiny_model()
    CircuitTuner(model, toy_task(), CFG).run(root)
    return root, [p.detach().clone() for p in W.real_parameters(model)]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _resume(root: Path, **kwargs) -> tuple[list[torch.Tensor], list[str]]:
    model = tiny_model(**kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CircuitTuner(model, toy_task(), CFG).run(root)
    lines = [str(w.message) for w in caught if issubclass(w.category, RunDirWarning)]
    return list(W.real_parameters(model)), lines


DAMAGE = {
    "flipped weights": lambda d: _flip(d / "weights.safetensors"),
    "flipped state": lambda d: _flip(d / "state.pt"),
    "flipped weights header": lambda d: _flip(d / "weights.safetensors", offset=10),
    "truncated weights": lambda d: _truncate(d / "weights.safetensors"),
    "truncated state": lambda d: _truncate(d / "state.pt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_falls_back_to_the_newest_intact_one(
    damage: str, finished, tmp_path: Path
) -> None:
    root = _copy(finished[0], tmp_path / "run")
    DAMAGE[damage](root / "checkpoints" / "step_000004")
    weights, lines = _resume(root)
    assert len(lines) == 1 and "resuming from checkpoint step 2" in lines[0], lines
    assert (root / "checkpoints" / "step_000004.damaged").is_dir()
    assert (root / "checkpoints" / "step_000004").is_dir()  # re-written by the resumed run
    for a, b in zip(weights, finished[1], strict=True):  # steps 3-4 recomputed exactly
        assert torch.equal(a, b)
    assert [r["step"] for r in map(json.loads, (root / "metrics.jsonl").read_text()
                                   .splitlines())] == [0, 2, 4]


def test_legacy_run_without_checksums_resumes_with_one_warning(finished, tmp_path) -> None:
    root = _copy(finished[0], tmp_path / "run")
    doc = json.loads((root / "run.json").read_text())
    del doc["initial_sha256"], doc["data"]
    (root / "run.json").write_text(json.dumps(doc))
    for step in (2, 4):
        (root / "checkpoints" / f"step_{step:06d}" / "checksums.json").unlink()
    _truncate(root / "checkpoints" / "step_000004" / "state.pt")  # found by parsing
    weights, lines = _resume(root)
    assert len(lines) == 2, lines
    assert "older ctlens" in lines[0] and "resuming from checkpoint step 2" in lines[1]
    for a, b in zip(weights, finished[1], strict=True):
        assert torch.equal(a, b)


def test_damaged_initial_weights(finished, tmp_path: Path) -> None:
    root = _copy(finished[0], tmp_path / "run")
    initial = root / "checkpoints" / "initial.safetensors"
    original = initial.read_bytes()
    _flip(initial)
    with pytest.raises(RunConflictError, match="initial.safetensors is damaged"):
        _resume(root, seed=5)  # not the run's start model: cannot restore
    _, lines = _resume(root)  # the start model: restored, by its sha256
    assert len(lines) == 1 and "restored" in lines[0]
    assert initial.read_bytes() == original


def test_changed_data_is_refused_naming_the_field(finished, tmp_path: Path) -> None:
    root = _copy(finished[0], tmp_path / "run")
    with pytest.raises(RunConflictError, match="n_train: 24 in run.json vs 20 now"):
        CircuitTuner(tiny_model(), toy_task(n=20), CFG).run(root)
    with pytest.raises(RunConflictError, match="train_sha256"):
        CircuitTuner(tiny_model(), toy_task(seed=4), CFG).run(root)


def test_raising_steps_on_a_finished_run_is_refused(finished, tmp_path: Path) -> None:
    root = _copy(finished[0], tmp_path / "run")
    longer = TuneConfig(**{**CFG.to_dict(), "steps": 8, "betas": CFG.betas})
    with pytest.raises(RunConflictError, match="steps: 4 vs 8.*steps cannot be changed"):
        CircuitTuner(tiny_model(), toy_task(), longer).run(root)


def test_user_files_are_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{\"mine\": true}")
    (out / "report.html").write_text("my report")
    tuner = CircuitTuner(tiny_model(), toy_task(), CFG)
    with pytest.raises(RunConflictError, match="holds no ctlens run"):
        tuner.run(out)
    with pytest.raises(RunConflictError, match="never deletes"):
        tuner.run(out, overwrite=True)
    assert (out / "model" / "config.json").read_text() == "{\"mine\": true}"
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.html"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep")
    CircuitTuner(tiny_model(), toy_task(), CFG).run(notes, overwrite=True)
    assert (notes / "notes.txt").read_text() == "keep" and (notes / "run.json").is_file()
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(RunConflictError, match="is a file"):
        tuner.run(afile)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_keeps_the_last_checkpoint(
    code: int, finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    original = R.write_bytes

    def failing(path: Path, data: bytes) -> None:
        if "step" not in path.parent.name and ".tmp-" in path.parent.name \
                and (root / "checkpoints" / "step_000002").is_dir():
            raise OSError(code, "simulated", str(path))
        original(path, data)

    with monkeypatch.context() as m:
        m.setattr(R, "write_bytes", failing)
        with pytest.raises(R.RunWriteError, match="could not write the checkpoint of step 4.*"
                           "last good checkpoint \\(step 2\\) is kept"):
            CircuitTuner(tiny_model(), toy_task(), CFG).run(root)
    names = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert names == ["initial.safetensors", "step_000002"]  # no partial temporary left
    weights, lines = _resume(root)
    assert lines == []
    for a, b in zip(weights, finished[1], strict=True):
        assert torch.equal(a, b)


def test_cli_write_error_is_one_line_exit_2(tmp_path, monkeypatch, capsys) -> None:
    from ctlens.cli import main

    model = tiny_model()
    monkeypatch.setattr(ctlens.model, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(ctlens.tasks.bundle, "load", lambda *a, **k: toy_task())

    def full(self, *args, **kwargs):
        raise R.RunWriteError(errno.ENOSPC, "could not write the checkpoint: disk full")

    monkeypatch.setattr(CircuitTuner, "run", full)
    assert main(["tune", "--out", str(tmp_path / "r"), "--top-n", "30"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the error is one line, the last; only tune's progress lines precede it
    assert err[-1] == "ctlens tune: error: could not write the checkpoint: disk full"
    assert [line for line in err if line.startswith("ctlens tune: error")] == err[-1:], err
    assert "Traceback" not in "".join(err), err


def test_cli_checks_top_n_before_loading_the_task(tmp_path, monkeypatch, capsys) -> None:
    from ctlens.cli import main

    model = tiny_model()
    monkeypatch.setattr(ctlens.model, "load_model", lambda *a, **k: model)

    def no_task(*args, **kwargs):
        raise AssertionError("the task was loaded before --top-n was checked")

    monkeypatch.setattr(ctlens.tasks.bundle, "load", no_task)
    n_edges = ctlens.Graph.from_model(model).n_edges
    assert main(["tune", "--out", str(tmp_path / "r"), "--top-n", str(n_edges + 1)]) == 2
    assert f"choose at most {n_edges}" in capsys.readouterr().err


def test_training_rows_longer_than_the_context_are_refused() -> None:
    with pytest.raises(ValueError, match="20 tokens long but the model's context is 16"):
        CircuitTuner(tiny_model(), toy_task(seq=20), CFG)


# ---------------------------------------------------------------------- issue 26


def test_checkpoint_without_its_checksums_is_not_trusted(finished, tmp_path: Path) -> None:
    """A run that records checksums seals every checkpoint with checksums.json before the
    checkpoint appears, so one without it was changed afterwards: it is set aside like a
    damaged one, and the run resumes from the previous intact checkpoint (one warning naming
    both), recomputing the rest exactly."""
    root = _copy(finished[0], tmp_path / "run")
    step4 = root / "checkpoints" / "step_000004"
    _flip(step4 / "weights.safetensors")
    (step4 / "checksums.json").unlink()
    weights, lines = _resume(root)
    assert len(lines) == 1, lines
    assert "checksums.json is missing" in lines[0] and "resuming from checkpoint step 2" in \
        lines[0]
    assert (root / "checkpoints" / "step_000004.damaged").is_dir()
    for a, b in zip(weights, finished[1], strict=True):
        assert torch.equal(a, b)


def test_unreadable_run_json_is_named_and_never_cleared(finished, tmp_path: Path) -> None:
    """A torn run.json, one without "config" and one that is a directory: each is one
    message that says what it is, with or without --overwrite, and nothing is deleted."""
    cases = {
        "torn": (lambda p: p.write_text(p.read_text()[:40]), "is not valid JSON"),
        "no config": (lambda p: p.write_text(json.dumps(
            {k: v for k, v in json.loads(p.read_text()).items() if k != "config"})),
            'has no "config"'),
        "a directory": (lambda p: (p.unlink(), p.mkdir()), "run.json is a directory"),
    }
    for name, (damage, expected) in cases.items():
        root = _copy(finished[0], tmp_path / name.replace(" ", "_"))
        damage(root / "run.json")
        before = sorted(p.relative_to(root) for p in root.rglob("*"))
        for overwrite in (False, True):
            with pytest.raises(RunConflictError, match=expected) as info:
                CircuitTuner(tiny_model(), toy_task(), CFG).run(root, overwrite=overwrite)
            assert "no ctlens run wrote" not in str(info.value)
            assert "different run" not in str(info.value)
            if overwrite:
                assert "--overwrite does not delete it" in str(info.value)
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_checkpoint_state_of_another_run_is_refused_naming_the_file(
    finished, tmp_path: Path
) -> None:
    """A checkpoint folder copied from a run of the same model with other MLP groups: its
    weights fit and its checksums match, but its state.pt is another run's."""
    other = tmp_path / "other"
    grouped = TuneConfig(**{**CFG.to_dict(), "mlp_groups": 2, "betas": CFG.betas})
    CircuitTuner(tiny_model(), toy_task(), grouped).run(other)
    root = _copy(finished[0], tmp_path / "run")
    import shutil

    shutil.rmtree(root / "checkpoints" / "step_000004")
    shutil.copytree(other / "checkpoints" / "step_000004", root / "checkpoints" / "step_000004")
    with pytest.raises(W.CheckpointMismatchError,
                       match=r"step_000004/state.pt was written by another run \(mlp_groups"):
        CircuitTuner(tiny_model(), toy_task(), CFG).run(root)
