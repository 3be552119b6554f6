"""Bad inputs that used to get a raw, vague or wrong message, or a plan (issue 26).

Each is one line that names the file or value and the fix: paths of the wrong kind (one
wording everywhere, `ctlens.files.describe_path`), unsupported devices and dtypes, negative
sizes on the command line, and the planner refusing what the operation it plans refuses,
by the same checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2_module

import ctlens
from ctlens.cli import main

ROOT = Path(__file__).resolve().parent.parent
# child processes import the same ctlens as this one (the checkout under test)
PYTHONPATH = os.pathsep.join(p for p in sys.path if p and Path(p, "ctlens").is_dir())


def _one_line(capsys: pytest.CaptureFixture, args: list[str], *needles: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ctlens "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def scores() -> ctlens.EdgeScores:
    graph = ctlens.Graph.from_model(ctlens.load_model(tiny_gpt2_module()))
    gen = torch.Generator().manual_seed(0)
    return ctlens.EdgeScores(torch.randn(graph.valid.shape, generator=gen) * graph.valid, graph)


# ---------------------------------------------------------------------- paths


def test_paths_of_the_wrong_kind_are_named(scores: ctlens.EdgeScores, tmp_path: Path) -> None:
    from ctlens.files import describe_path

    circuit = ctlens.Circuit.from_scores(scores, top_n=10)
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert describe_path(folder) == "a directory" and describe_path(a_file) == "a file"
    assert describe_path(a_file / "x" / "y") == f"missing ({a_file} is a file, not a directory)"
    with pytest.raises(IsADirectoryError, match="circuit file .*folder is a directory, not a "
                                                "file; Circuit.load reads"):
        ctlens.Circuit.load(folder)
    for save in (lambda: circuit.save(a_file / "c.json"), lambda: scores.save(a_file / "s")):
        with pytest.raises(NotADirectoryError, match=f"{a_file} is a file, not a directory"):
            save()
    circuit.save(tmp_path / "c.json")
    with pytest.raises(ValueError, match="c.json: not a ctlens edge-score file .*circuit files "
                                         "load with Circuit.load"):
        ctlens.EdgeScores.load(tmp_path / "c.json")
    from ctlens.viz import read_run

    with pytest.raises(NotADirectoryError, match="run directory .*afile is a file, not a "
                                                 "directory"):
        read_run(a_file)


def test_truncated_model_weights_are_named(tmp_path: Path) -> None:
    from ctlens.tuning.weights import export_hf

    export_hf(ctlens.load_model(tiny_gpt2_module()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors "
                                         r"file .*truncated or damaged"):
        ctlens.load_model(tmp_path / "m")


# ---------------------------------------------------------------------- devices, dtypes


def test_float8_is_refused_by_load_model_and_plan() -> None:
    with pytest.raises(ValueError, match="dtype must be one of float32, .* not float8_e4m3fn"):
        ctlens.load_model(tiny_gpt2_module(), dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="not float8_e4m3fn"):
        ctlens.plan("gpt2", dtype="float8_e4m3fn")


@pytest.mark.parametrize("device", ["meta", "xla", "ipu"])
def test_devices_ctlens_does_not_run_on(device: str, capsys: pytest.CaptureFixture) -> None:
    _one_line(capsys, ["tune", "--out", "never", "--device", device],
              f"--device {device}: ctlens runs on cpu, cuda, mps")
    with pytest.raises(ValueError, match=f"not on {device} devices"):
        ctlens.load_model(tiny_gpt2_module(), device=device)


def test_float16_weights_are_refused_by_the_tuner_naming_float16() -> None:
    from tuning_toy import toy_task

    model = ctlens.load_model(tiny_gpt2_module(dtype=torch.float16))
    with pytest.raises(ValueError, match="weights are float16.*dtype='bfloat16'"):
        ctlens.CircuitTuner(model, toy_task(), ctlens.TuneConfig(top_n=30))


# ---------------------------------------------------------------------- command-line values


def test_negative_sizes_reach_their_own_check(capsys: pytest.CaptureFixture) -> None:
    """argparse took ``-5GB`` for an option ("expected one argument")."""
    _one_line(capsys, ["plan", "--model", "gpt2", "--budget", "-5GB"],
              "budget='-5GB': the memory budget must be positive")
    with pytest.raises(SystemExit) as info:  # an argparse type error: usage, then the line
        main(["tune", "--out", "never", "--max-memory", "-1GB"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and last.startswith("ctlens tune: error: argument "
                                                    "--max-memory") and "got '-1GB'" in last
    _one_line(capsys, ["tune", "--out", "never", "--lr", "-1e-3"], "lr must be a positive")
    assert not Path("never").exists()


# ---------------------------------------------------------------------- options that do nothing

IGNORED = [  # (TuneConfig arguments, the option that does nothing there, what it needs)
    ({"momentum": 0.5}, "momentum=0.5", "optimizer='sgd'"),
    ({"optimizer": "sgd", "betas": (0.8, 0.99)}, "betas=(0.8,0.99)", "optimizer='adamw'"),
    ({"discovery": "task", "batch_metric": "loss"}, "batch_metric='loss'", "discovery='batch'"),
    ({"random_match": "edges"}, "random_match='edges'", "mode='random'"),
    ({"mode": "full", "lora_rank": 4}, "lora_rank=4", "mode='lora'"),
    ({"lora_alpha": 4.0}, "lora_alpha=4.0", "mode='lora'"),
]


@pytest.mark.parametrize(("kwargs", "option", "needs"), IGNORED)
def test_tune_config_refuses_an_option_that_does_nothing(
    kwargs: dict, option: str, needs: str
) -> None:
    """``--momentum`` with AdamW and ``--betas`` with SGD used to be ignored silently."""
    with pytest.raises(ValueError) as err:
        ctlens.TuneConfig(**kwargs)
    message = str(err.value)
    assert message.startswith(f"{option} (--") and f"applies only with {needs}" in message
    assert "\n" not in message


def test_an_option_is_kept_where_it_applies() -> None:
    config = ctlens.TuneConfig(optimizer="sgd", momentum=0.5, mode="random",
                               random_match="edges")
    assert (config.momentum, config.random_match) == (0.5, "edges")
    lora = ctlens.TuneConfig(mode="lora", lora_rank=4, lora_alpha=4.0)
    assert (lora.lora_rank, lora.lora_alpha) == (4, 4.0)
    task = ctlens.TuneConfig(discovery="task", discovery_ablation="zero", betas=(0.8, 0.99))
    assert task.betas == (0.8, 0.99)


@pytest.mark.parametrize(("flags", "refused"), [
    (["--momentum", "0.9"], "--momentum 0.9"),  # the default, given: does nothing with AdamW
    (["--optimizer", "sgd", "--betas", "0.9", "0.999"], "--betas 0.9 0.999"),
    (["--mode", "full", "--lora-alpha", "2.5"], "--lora-alpha 2.5"),
    (["--discovery", "task", "--batch-metric", "task"], "--batch-metric task"),
])
def test_tune_refuses_a_flag_that_does_nothing_before_any_work(
    flags: list[str], refused: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    err = _one_line(capsys, ["tune", "--out", str(out), *flags], "applies only with --")
    assert err.split("error: ")[1].startswith(f"{refused} applies only with --"), err
    assert "=" not in err  # the command line's spelling only
    assert not out.exists()


def test_an_old_run_with_an_ignored_option_still_resumes() -> None:
    """A ``run.json`` written before the refusal holds what its run ignored: it reads as the
    default (it changed nothing), so the run's config still loads and compares equal."""
    old = ctlens.TuneConfig().to_dict() | {"momentum": 0.3, "lora_rank": 2}
    assert ctlens.TuneConfig.from_dict(old) == ctlens.TuneConfig()
    sgd = ctlens.TuneConfig(optimizer="sgd", momentum=0.3).to_dict()
    assert ctlens.TuneConfig.from_dict(sgd).momentum == 0.3


# ---------------------------------------------------------------------- the planner


def _config_dir(tmp_path: Path, **changes: int) -> Path:
    from ctlens import real_shapes

    config = real_shapes.shape("gpt2").hf_config().to_dict()
    config.update(changes)
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("args", "expected"), [
    (["--seq-len", "1000000000"], "has 1000000000 tokens but the model's context is 1024"),
    (["--mlp-groups", "7"], "mlp_groups=7 does not split the MLP width 3072"),
    (["--ranks", "4", "--batch-size", "2"], "batch_size=2 is smaller than the number of ranks"),
    (["--dtype", "float8_e4m3fn"], "not float8_e4m3fn"),
    (["--batch-size", "9" * 400], "beyond any device"),
])
def test_plan_refuses_what_the_operation_refuses(
    args: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    _one_line(capsys, ["plan", "--model", "gpt2", *args], expected)


def test_plan_refuses_a_damaged_config_before_building_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _config_dir(tmp_path, n_layer=-3)
    _one_line(capsys, ["plan", "--model", str(folder)], "= -3;", "the config is damaged")


def test_plan_bounds_the_graph_before_building_anything(tmp_path: Path) -> None:
    """A config of a million layers used to build forever (45 MB/s); the bound is the
    circuit files' (`ctlens.file_limits.MAX_DENSE_CELLS`). Run in a subprocess with a time
    limit so that a regression fails instead of hanging the suite."""
    folder = _config_dir(tmp_path, n_layer=1_000_000)
    done = subprocess.run([sys.executable, "-m", "ctlens", "plan", "--model", str(folder)],
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": PYTHONPATH or str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "1000000 layers" in done.stderr and "more than the 1,073,741,824" in done.stderr


def test_every_plan_printed_is_positive() -> None:
    for mode in ("attribute", "forward", "tune"):
        for kwargs in ({}, {"ranks": 2, "shard": True}, {"budget": "80GB"}):
            result = ctlens.plan("gpt2", mode=mode, **kwargs)
            assert all(v >= 0 for v in result.parts.values()) and result.peak_bytes > 0
