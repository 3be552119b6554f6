"""Sparse export: save_delta / apply_delta and the make-delta / apply-delta commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ctlens
from ctlens.cli.apply_delta import add_apply_delta_command
from ctlens.cli.make_delta import add_make_delta_command
from ctlens.delta import (
    DeltaMismatchError,
    DeltaOutputError,
    apply_delta,
    read_manifest,
    save_delta,
    weights_of,
    write_weights,
)
from ctlens.tuning import weights


def _cli(*args: str) -> int:
    """Run ``ctlens ARGS`` for the delta commands in process (errors -> exit 2)."""
    parser = argparse.ArgumentParser(prog="ctlens")
    commands = parser.add_subparsers(dest="command")
    add_make_delta_command(commands)
    add_apply_delta_command(commands)
    parsed = parser.parse_args(list(args))
    try:
        return parsed.func(parsed)
    except (ValueError, FileNotFoundError) as err:
        print(f"ctlens {parsed.command}: error: {err}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object, Path]:
    """A short circuit-tuning run of zoo:tiny-gpt2: (base weights, tuned model, run dir)."""
    out = tmp_path_factory.mktemp("delta") / "run"
    model = ctlens.load_model("zoo:tiny-gpt2")
    base = {k: v.clone() for k, v in weights.unique_state_dict(model).items()}
    task = ctlens.tasks.load("agreement", n=16, n_train=16, n_general=8)
    config = ctlens.TuneConfig(steps=2, top_n=30, batch_size=8, eval_every=2, save_every=2,
                               eval_examples=8, progress=False, lr=1e-2)
    ctlens.CircuitTuner(model, task, config).run(out)
    return base, model, out


def test_base_plus_delta_is_the_tuned_model(tuned_run, tmp_path: Path) -> None:
    base, tuned, _ = tuned_run
    info = save_delta(base, tuned, tmp_path / "delta")
    target = weights.unique_state_dict(tuned)
    changed = [k for k in target if not torch.equal(base[k], target[k])]
    assert info.changed_tensors == len(changed) > 0
    assert 0 < info.changed_values < info.total_values

    fresh = ctlens.load_model("zoo:tiny-gpt2")
    apply_delta(fresh, tmp_path / "delta")  # in place, through the bridge's own tensors
    for key, value in weights.unique_state_dict(fresh).items():
        assert torch.equal(value, target[key]), key
    # the bridge computes with the new weights (GPT-2's q/k/v views follow the fused matrix)
    tokens = torch.randint(1, fresh.cfg.d_vocab, (2, 6))
    assert torch.equal(fresh(tokens), tuned(tokens))

    manifest = read_manifest(tmp_path / "delta")
    assert set(manifest["changed"]) == set(changed)
    assert set(manifest["base_sha256"]) == set(base)


def test_wrong_base_is_refused_and_left_alone(tuned_run, tmp_path: Path) -> None:
    base, tuned, _ = tuned_run
    save_delta(base, tuned, tmp_path / "delta")
    other = ctlens.load_model("zoo:tiny-llama")
    with pytest.raises(DeltaMismatchError, match="no tensor"):
        apply_delta(other, tmp_path / "delta")
    # same layout, other values: the tuned model itself is not the base
    before = {k: v.clone() for k, v in weights.unique_state_dict(tuned).items()}
    with pytest.raises(DeltaMismatchError, match="other base weights"):
        apply_delta(tuned, tmp_path / "delta")
    for key, value in weights.unique_state_dict(tuned).items():
        assert torch.equal(value, before[key])
    wrong_shape = {k: v.clone() for k, v in base.items()}
    name = next(iter(read_manifest(tmp_path / "delta")["changed"]))
    wrong_shape[name] = torch.zeros(3)
    with pytest.raises(DeltaMismatchError, match="shape"):
        apply_delta(wrong_shape, tmp_path / "delta")


def test_slices_are_recorded_per_axis(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"m": torch.randn(6, 8, generator=gen), "v": torch.randn(10, generator=gen),
            "s": torch.tensor(1.0), "same": torch.ones(4),
            "b16": torch.randn(4, 4, generator=gen).bfloat16()}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["m"][:, 2:4] += 1.0  # two columns
    tuned["m"][1, 6] -= 1.0  # and one entry of a third
    tuned["v"][[0, 1, 7]] = 0.5
    tuned["s"] = torch.tensor(2.0)
    tuned["b16"][3] = 0
    info = save_delta(base, tuned, tmp_path / "d")
    changed = read_manifest(tmp_path / "d")["changed"]
    assert set(changed) == {"m", "v", "s", "b16"}
    assert changed["m"]["axis"] == 1 and changed["m"]["ranges"] == [[2, 4], [6, 7]]
    assert changed["v"]["axis"] == 0 and changed["v"]["ranges"] == [[0, 2], [7, 8]]
    assert changed["s"]["axis"] is None
    assert changed["b16"]["axis"] == 0 and changed["b16"]["ranges"] == [[3, 4]]
    assert info.changed_values == 18 + 3 + 1 + 4
    result = apply_delta(base, tmp_path / "d")
    for key in base:
        assert torch.equal(result[key], tuned[key]), key
    assert torch.equal(base["m"], weights_of(base)["m"])  # a mapping is not modified


def test_save_delta_refuses_different_layouts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="different tensors"):
        save_delta({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, tmp_path / "d")
    with pytest.raises(ValueError, match="same layout"):
        save_delta({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, tmp_path / "d")
    with pytest.raises(TypeError, match="weights come from"):
        save_delta(3, {"a": torch.zeros(2)}, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_delta_commands_round_trip(tuned_run, tmp_path: Path, capsys) -> None:
    base, tuned, run = tuned_run
    base_dir = tmp_path / "base"
    base_model = ctlens.load_model("zoo:tiny-gpt2")
    weights.export_hf(base_model, base_dir)
    tuned_dir = run / "model"
    assert _cli("make-delta", str(base_dir), str(tuned_dir), "--out", str(tmp_path / "d")) == 0
    out = capsys.readouterr().out
    assert "tensors changed" in out and "for the full weights" in out
    delta_bytes = sum(f.stat().st_size for f in (tmp_path / "d").iterdir())
    full_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    assert delta_bytes < full_bytes

    assert _cli("apply-delta", str(base_dir), str(tmp_path / "d"), "--out",
                str(tmp_path / "out")) == 0
    reloaded = ctlens.load_model(str(tmp_path / "out"))
    expected = weights.unique_state_dict(tuned)
    for key, value in weights.unique_state_dict(reloaded).items():
        assert torch.equal(value, expected[key]), key
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt2"

    # applying to a model directory it was not made from: one line, exit 2, nothing written
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    state = weights_of(base_dir)
    state["transformer.wte.weight"] = state["transformer.wte.weight"] + 1
    save_file(state, str(wrong / "model.safetensors"))
    assert _cli("apply-delta", str(wrong), str(tmp_path / "d"), "--out",
                str(tmp_path / "out2")) == 2
    assert "other base weights" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
    assert _cli("apply-delta", str(base_dir), str(tmp_path / "nothing"), "--out",
                str(tmp_path / "out3")) == 2
    assert "is not a ctlens delta" in capsys.readouterr().err


def _pair() -> tuple[dict, dict]:
    base = {"m": torch.zeros(4, 4), "v": torch.zeros(3)}
    tuned = {"m": base["m"].clone(), "v": base["v"] + 1}
    tuned["m"][1] = 2.0
    return base, tuned


def test_delta_output_is_checked_before_any_work(tmp_path: Path) -> None:
    """A directory that is not a previous delta is refused (before the inputs are even
    read: ``base=3`` would be a TypeError) unless ``overwrite``, which writes beside the
    user's files; a previous delta is replaced; a file or an input is always refused."""
    base, tuned = _pair()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DeltaOutputError, match="not empty .*'notes.txt'.*--overwrite"):
        save_delta(3, tuned, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    save_delta(base, tuned, mine, overwrite=True)  # written beside the user's file, kept
    assert sorted(p.name for p in mine.iterdir()) == [
        "delta.safetensors", "manifest.json", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"

    (tmp_path / "empty").mkdir()
    save_delta(base, tuned, tmp_path / "empty")
    tuned["v"] = base["v"]  # a previous delta is replaced by the new one
    save_delta(base, tuned, tmp_path / "empty")
    assert set(read_manifest(tmp_path / "empty")["changed"]) == {"m"}

    (tmp_path / "file").write_text("x")
    with pytest.raises(DeltaOutputError, match="is a file"):
        save_delta(base, tuned, tmp_path / "file", overwrite=True)
    save_file(base, str(tmp_path / "base.safetensors"))
    with pytest.raises(DeltaOutputError, match="also an input"):
        save_delta(tmp_path / "base.safetensors", tuned, tmp_path / "base.safetensors")


def test_applied_model_output_is_checked_before_any_work(tmp_path: Path) -> None:
    """apply-delta replaces its own earlier output, refuses any other non-empty directory
    (unless overwrite), never replaces a file it did not write, and never writes over the
    base or the delta."""
    base, tuned = _pair()
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base, str(base_dir / "model.safetensors"))
    (base_dir / "config.json").write_text("{}")
    save_delta(base, tuned, tmp_path / "d")
    out = write_weights(base_dir, tmp_path / "d", tmp_path / "out")
    write_weights(base_dir, tmp_path / "d", out)  # its own output: replaced
    assert torch.equal(weights_of(out)["m"], tuned["m"])
    other = tmp_path / "other_model"
    other.mkdir()
    save_file(base, str(other / "model.safetensors"))  # a model apply-delta did not write
    with pytest.raises(DeltaOutputError,
                       match="holds no model directory written by apply-delta"):
        write_weights(base_dir, tmp_path / "nothing", other)  # refused before reading
    assert torch.equal(weights_of(other)["v"], base["v"])
    with pytest.raises(DeltaOutputError, match="model.safetensors that no .* never deletes"):
        write_weights(base_dir, tmp_path / "d", other, overwrite=True)  # the user's weights
    assert torch.equal(weights_of(other)["v"], base["v"])
    for target in (base_dir, tmp_path / "d"):
        with pytest.raises(DeltaOutputError, match="also an input"):
            write_weights(base_dir, tmp_path / "d", target, overwrite=True)
    assert torch.equal(weights_of(base_dir)["v"], base["v"])


def test_delta_commands_check_out(tmp_path: Path, capsys) -> None:
    """Through the real command line: one line, exit 2, nothing touched; --overwrite."""
    from ctlens.cli import main

    base, tuned = _pair()
    save_file(base, str(tmp_path / "a.safetensors"))
    save_file(tuned, str(tmp_path / "b.safetensors"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["make-delta", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
            "--out", str(mine)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctlens make-delta: error:") and "--overwrite" in err
    assert err.count("\n") == 1 and (mine / "notes.txt").exists()
    assert main([*args, "--overwrite"]) == 0  # beside the user's file, which is kept
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "manifest.json").is_file()
    assert main([*args[:-1], str(tmp_path / "a.safetensors")]) == 2
    assert "is a file" in capsys.readouterr().err
