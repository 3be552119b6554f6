"""The scaling recipe of docs/tuning.md runs as written, up to the point that needs GPUs.

Every shell command of "Step by step: one machine with 8 GPUs" and "Will it fit?" is parsed
by the real ``ctlens`` parser (an unknown flag or a bad value fails here, as it would for a
reader); the ``plan`` commands run, and their recommended batches are the ``--batch-size``
the recipe then uses; the quoted planner error is what the command prints; ``--help`` runs;
and the CPU dry run of step 0 runs under torchrun as written (slow).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctlens import cli

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "tuning.md").read_text()


def _section(title: str) -> str:
    start = PAGE.index(f"### {title}")
    return PAGE[start:PAGE.index("\n### ", start + 1)]


RECIPE = _section("Step by step: one machine with 8 GPUs")
FIT = _section("Will it fit? `ctlens plan`")


def _commands(text: str) -> list[str]:
    """The shell commands of the ```bash blocks of ``text`` (continuations joined)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip()]
    return commands


def _ctlens_argv(command: str) -> list[str] | None:
    """The ``ctlens`` arguments of a shell command (after ``torchrun ... -m ctlens``, before a
    pipe), or None for a command that is not ctlens's."""
    words = shlex.split(command.split(" | ")[0])
    if words[0] == "ctlens":
        return words[1:]
    if words[0] == "torchrun":
        return words[words.index("ctlens") + 1:]
    return None


ALL = [c for c in _commands(RECIPE) + _commands(FIT) if _ctlens_argv(c) is not None]


def test_the_recipe_has_its_steps() -> None:
    kinds = [tuple(_ctlens_argv(c)[:1]) for c in _commands(RECIPE)]  # type: ignore[index]
    assert kinds.count(("plan",)) == 2 and kinds.count(("tune",)) == 3, kinds
    assert ("make-delta",) in kinds and ("apply-delta",) in kinds


@pytest.mark.parametrize("command", ALL)
def test_every_command_parses_with_the_real_flags(command: str) -> None:
    argv = _ctlens_argv(command)
    assert argv is not None
    if "--help" in argv:
        with pytest.raises(SystemExit) as stop:
            cli.build_parser().parse_args(argv)
        assert stop.value.code == 0
        return
    args = cli.build_parser().parse_args(argv)  # exits 2 on an unknown flag or bad value
    assert args.command == argv[0]


def _plan(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _recommended(out: str) -> int:
    (batch,) = re.findall(r"largest batch that fits: (\d+)", out)
    return int(batch)


def test_the_plans_answer_the_batch_sizes_the_recipe_uses(capsys: pytest.CaptureFixture) -> None:
    """Step 1's tuning plan gives step 3's global --batch-size (planned with fp32 weights,
    as tuning requires); the attribution plan gives the batch its text quotes."""
    text = " ".join(RECIPE.split())
    answers = {}
    for command in _commands(RECIPE):
        argv = _ctlens_argv(command)
        if argv is None or argv[0] != "plan":
            continue
        code, out, err = _plan(argv, capsys)
        assert code == 0, err
        mode = argv[argv.index("--mode") + 1]
        answers[mode] = _recommended(out)
        if mode == "tune":
            assert "--dtype" not in argv, "tuning trains fp32 weights: plan it without --dtype"
    assert f"`--dtype bfloat16`: batch {answers['attribute']} fits" in text
    assert f"the answer, batch {answers['tune']}, is the *global*" in text
    tune = next(_ctlens_argv(c) for c in _commands(RECIPE) if "meta-llama" in c)
    assert tune is not None and "--precision" in tune and "--dtype" not in tune
    assert int(tune[tune.index("--batch-size") + 1]) == answers["tune"]
    python = re.search(r'TuneConfig\(shard="fsdp", precision="bf16", batch_size=(\d+)', RECIPE)
    assert python is not None and int(python.group(1)) == answers["tune"]


def test_the_quoted_planner_error_is_what_it_prints(capsys: pytest.CaptureFixture) -> None:
    (quoted,) = re.findall(r"```text\n\$ (ctlens plan [^\n]*)\n(.*?)```", FIT, flags=re.S)
    command, message = quoted
    code, _, err = _plan(shlex.split(command)[1:], capsys)
    assert code == 2
    assert err.strip() == " ".join(message.split())


def test_help_as_the_recipe_runs_it() -> None:
    (command,) = [c for c in _commands(RECIPE) if "--help" in c]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert "--precision" in done.stdout and "--shard" in done.stdout


@pytest.mark.slow
def test_the_cpu_dry_run_runs_as_written(tmp_path: Path) -> None:
    """Step 0 under torchrun, two gloo processes, exactly as the page writes it."""
    (command,) = [c for c in _commands(RECIPE) if "zoo:tiny-llama" in c]
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed next to this Python")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "dry-run"
    assert (run / "run.json").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2
