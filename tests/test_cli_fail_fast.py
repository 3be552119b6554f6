"""A user's second day with the ``ctlens`` command (issue 23): typos fail at once, in one line
and before torch is imported; ``ctlens tasks``; help that says each default once;
``--n-examples``; one default model; command-line spellings in errors; ``tune``'s phases.

Whether torch was imported is read from ``sys.modules`` in a fresh interpreter, never from
the clock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctlens import cli, zoo
from ctlens.cli.support import DEFAULT_MODEL
from ctlens.tasks.catalog import DESCRIPTIONS

ROOT = Path(__file__).resolve().parents[1]


def _run_fresh(argv: list[str], cwd: Path = ROOT) -> tuple[int, str, str, bool]:
    """``ctlens ARGV`` in a new interpreter: exit status, stdout, stderr, torch imported."""
    code = ("import sys\nfrom ctlens.cli import main\ncode = main(sys.argv[1:])\n"
            "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=cwd, timeout=300)
    *out, flag = done.stdout.splitlines()
    return done.returncode, "\n".join(out), done.stderr, flag.endswith("True")


def _write_run(out: Path, model: str, task: str, **config: object) -> None:
    """A ``run.json`` as the tuner writes it (only what the early check reads), for the
    default --n-examples 256 and --n-train 1024."""
    from ctlens.tuning.config import TuneConfig

    out.mkdir(parents=True)
    doc = {"model": model, "task": task, "config": TuneConfig(**config).to_dict(),
           "data": {"n_train": 1024, "train_length": 12, "n_discovery": 256}}
    (out / "run.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["discover", "--model", "zoo:tiny-gtp2"],
         ["unknown zoo model 'tiny-gtp2'", "available: " + ", ".join(zoo.names())]),
        (["discover", "--task", "agreemnt"],
         ["unknown task 'agreemnt'", "ctlens tasks", "agreement-flip"]),
        (["discover", "--task", "missing.jsonl"], ["task file missing.jsonl does not exist"]),
        (["discover", "--model", "./no-such-model"],
         ["'./no-such-model' is not a model directory"]),
        (["tune", "--out", "OUT", "--model", "zoo:nope"], ["unknown zoo model 'nope'"]),
        (["tune", "--out", "OUT", "--task", "flip"], ["unknown task 'flip'"]),
        (["plan", "--model", "llama-9b"], ["unknown model shape 'llama-9b'", "llama-3.1-8b"]),
    ],
)
def test_a_wrong_name_fails_in_one_line_before_torch(
    argv: list[str], needles: list[str], tmp_path: Path
) -> None:
    argv = [str(tmp_path / "run") if a == "OUT" else a for a in argv]
    code, out, err, torch_loaded = _run_fresh(argv, cwd=tmp_path)
    assert code == 2, err
    assert not torch_loaded
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ctlens {argv[0]}: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_a_different_run_in_out_is_refused_before_torch(tmp_path: Path) -> None:
    """Resuming into a run of another model, task or config failed only after the model
    loaded; now before torch, naming the flags as typed, in command-line spelling."""
    out = tmp_path / "run"
    _write_run(out, "zoo:tiny-llama", "agreement-flip", steps=60, top_n=120)
    code, _, err, torch_loaded = _run_fresh(
        ["tune", "--out", str(out), "--steps", "80", "--top-n", "120"])
    assert code == 2 and not torch_loaded
    line = err.strip()
    assert "\n" not in line
    for needle in ("holds a different run", "--model 'zoo:tiny-llama' there, 'zoo:tiny-gpt2' now",
                   "--steps 60 there, 80 now", "a run's --steps cannot be changed",
                   "pass --overwrite"):
        assert needle in line, line
    assert "overwrite=True" not in line
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_the_same_run_passes_the_early_check(tmp_path: Path) -> None:
    """Only a real difference is refused: the run's own flags (and operational ones, such as
    --no-progress) pass the check that runs before torch."""
    from ctlens.cli.tune import check_tune

    out = tmp_path / "run"
    _write_run(out, DEFAULT_MODEL, "agreement-flip", steps=60, top_n=120)
    parser = cli.build_parser()
    same = parser.parse_args(["tune", "--out", str(out), "--steps", "60", "--top-n", "120",
                              "--no-progress"])
    check_tune(same)
    check_tune(parser.parse_args(["tune", "--out", str(out), "--steps", "9", "--overwrite"]))
    other_size = parser.parse_args(["tune", "--out", str(out), "--steps", "60", "--top-n",
                                    "120", "--n-examples", "64", "--n-train", "1024"])
    with pytest.raises(ValueError, match="--n-examples 256 there, 64 now"):
        check_tune(other_size)


def test_library_messages_keep_the_command_line_spelling() -> None:
    """Messages written for both audiences, ``name=value (--flag)``, read as flags here."""
    text = cli._one_line(ValueError(
        "runs/x holds a different run (lr: 0.001 vs 0.01); choose another output directory or "
        "pass overwrite=True (--overwrite) to replace it"))
    assert text.endswith("or pass --overwrite to replace it")
    assert "use more ranks with --shard fsdp," in cli._one_line(
        ValueError("use more ranks with shard=True (--shard fsdp), a shorter sequence"))


def test_ctlens_tasks_lists_every_task_in_one_line_each() -> None:
    code, out, err, torch_loaded = _run_fresh(["tasks"])
    assert code == 0, err
    assert not torch_loaded
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(DESCRIPTIONS)
    for line, description in zip(lines, DESCRIPTIONS.values(), strict=True):
        assert line.endswith(description)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every (sub-)command's parser by its words: ``"tune"``, ``"zoo train"``, ..."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: str) -> None:
        found[words] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{words} {name}".strip())

    walk(cli.build_parser(), "")
    return found


@pytest.mark.parametrize("words", sorted(_parsers()))
def test_help_states_each_default_once(words: str) -> None:
    """No "(default cpu) (default: None)", no default for a required option, no None."""
    parser = _parsers()[words]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action)
        name = "/".join(action.option_strings) or action.dest
        assert text.lower().count("default") <= 1, f"{words} {name}: {text}"
        assert "(default: None)" not in text, f"{words} {name}: {text}"
        if action.required:
            assert "default" not in text.lower(), f"{words} {name}: {text}"
    parser.format_help()  # and the whole page still renders


@pytest.mark.parametrize("command", ["discover", "tune"])
def test_n_examples_is_the_documented_name_and_n_a_hidden_alias(command: str) -> None:
    parser = _parsers()[command]
    page = parser.format_help()
    assert "--n-examples N" in page
    assert "--n " not in page and "--n," not in page
    extra = ["--out", "run"] if command == "tune" else []
    assert parser.parse_args([*extra, "--n-examples", "12"]).n == 12
    assert parser.parse_args([*extra, "--n", "12"]).n == 12  # old scripts keep working
    default = parser.parse_args(extra).n
    assert default == (256 if command == "tune" else 128)


def test_discover_and_tune_start_from_the_same_model() -> None:
    parsers = _parsers()
    discover = parsers["discover"].parse_args([])
    tune = parsers["tune"].parse_args(["--out", "run"])
    assert discover.model == tune.model == DEFAULT_MODEL
    assert (discover.task, tune.task) == ("agreement", "agreement-flip")


def test_tune_prints_its_phases_and_one_finished_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """From the first second, phases on stderr in order; the finished progress bar once (it
    was printed again after the export, below a nested "Writing model shards" bar)."""
    out = tmp_path / "run"
    argv = ["tune", "--out", str(out), "--steps", "2", "--n-examples", "8", "--n-train", "16",
            "--eval-examples", "8", "--top-n", "20", "--eval-every", "2", "--save-every", "2",
            "--batch-size", "4"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    order = ["loading torch and the tuner ...", f"loading {DEFAULT_MODEL} ...",
             "building task 'agreement-flip' (8 examples, 16 training rows) ...",
             "circuit-tuning (gradient) for 2 steps", "circuit-tune (gradient)", "results in"]
    positions = [err.find(text) for text in order]
    assert -1 not in positions and positions == sorted(positions), err
    assert "Writing model shards" not in err
    bars = [line for line in err.split("\n") if "circuit-tune (gradient)" in line]
    assert len(bars) == 1, bars
    assert (out / "model" / "config.json").is_file()
