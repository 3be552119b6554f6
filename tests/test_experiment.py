"""The experiment runner's protocol (benchmarks/experiment.py): grid extension where the
best lr sits on an edge, and runs that repeat digit for digit through `ctlens tune`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import experiment as E  # noqa: E402

import ctlens  # noqa: E402


def _args(tmp_path: Path, *extra: str) -> object:
    return E.parser().parse_args(["plan", "--out", str(tmp_path), *extra])


def _fake_run(root: Path, cond: E.Condition, curve: list[tuple[float, float]],
              steps: int = 60) -> None:
    """A finished run directory whose evaluations follow ``curve`` [(target, general)]."""
    run = root / cond.key
    run.mkdir(parents=True)
    stride = steps // (len(curve) - 1)
    lines = [json.dumps({"step": i * stride, "target_metric": t, "general_loss": g,
                         "params_moved": 0.1 * i, "wall_time": 10.0 + i})
             for i, (t, g) in enumerate(curve)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "run.json").write_text(json.dumps({"config": {"top_n": 12}}))


def _reaching(loss: float | None) -> list[tuple[float, float]]:
    """A linear fake curve from (target -3, general 1.6) whose general loss at target +1 is
    ``loss`` (80 % of the way to its end at +2), or that stops at +0.5 (``None``)."""
    return [(-3.0, 1.6), (0.5, 1.6) if loss is None else (2.0, 1.6 + (loss - 1.6) / 0.8)]


def test_lr_ladder_and_seeds() -> None:
    assert E.next_lr(3e-3, up=True) == 1e-2 and E.next_lr(3e-4, up=False) == 1e-4
    assert E.next_lr(1e-3, up=True) == 3e-3 and E.next_lr(3e-1, up=True) == 1.0
    assert E.next_lr(5e-4, up=True) == 1e-3  # off the ladder: its next rung
    assert E.parse_seeds("1-10") == list(range(1, 11))
    assert E.parse_seeds("1-3,7") == [1, 2, 3, 7]


def test_headline_grid_is_the_default(tmp_path: Path) -> None:
    args = _args(tmp_path)
    plan = E.planned(args)
    assert len(plan) == 3 * (3 + 2 * 3 + 2 * 3) * 10  # per model: full x 3 lrs, 2 x 2 x 3
    assert {c.mode for c in plan} == {"full", "gradient", "random-parameters"}
    assert {c.model for c in plan} == {"zoo:tiny-gpt2", "zoo:tiny-llama", "zoo:mini-gpt2"}
    assert {c.size for c in plan} == {None, 0.015} and {c.groups for c in plan} == {1, 8}
    assert all(c.groups == 1 for c in plan if c.mode == "full")


def test_grid_grows_where_the_best_lr_sits_on_an_edge(tmp_path: Path) -> None:
    """The best lr (most seeds' envelope pick at +1) on the top edge adds the next lr up,
    once every seed has finished; an inner best lr stops the growth."""
    args = _args(tmp_path, "--models", "zoo:tiny-gpt2", "--modes", "gradient", "--groups",
                 "1", "--seeds", "1,2", "--max-extend", "2")
    cell = E.Cell("zoo:tiny-gpt2", 1, 0.015, "gradient")
    assert E.cell_lrs(cell, args) == ([3e-4, 1e-3, 3e-3], False)  # nothing finished yet
    # general loss at target +1: lower for larger lrs up to 1e-2, then worse at 3e-2
    loss_at_one = {3e-4: None, 1e-3: 1.9, 3e-3: 1.8, 1e-2: 1.7, 3e-2: 2.5}
    for lr, loss in loss_at_one.items():
        for seed in (1, 2):
            _fake_run(tmp_path, cell.at(lr, seed), _reaching(loss))
    lrs, final = E.cell_lrs(cell, args)
    assert (lrs, final) == ([3e-4, 1e-3, 3e-3, 1e-2, 3e-2], True)
    assert E.best_lrs({lr: {s: E.records(tmp_path / cell.at(lr, s).key, 60) for s in (1, 2)}
                       for lr in lrs}) == {1e-2}
    # capped: with one extension allowed the grid stops at 1e-2 even though it is the edge
    capped = _args(tmp_path, "--models", "zoo:tiny-gpt2", "--modes", "gradient", "--groups",
                   "1", "--seeds", "1,2", "--max-extend", "1")
    assert E.cell_lrs(cell, capped) == ([3e-4, 1e-3, 3e-3, 1e-2], True)
    assert not E.pending(args)


def test_no_seed_reaching_the_threshold_grows_towards_the_highest_final_target(
    tmp_path: Path,
) -> None:
    args = _args(tmp_path, "--models", "zoo:tiny-gpt2", "--modes", "gradient", "--groups",
                 "1", "--seeds", "1", "--max-extend", "1")
    cell = E.Cell("zoo:tiny-gpt2", 1, 0.015, "gradient")
    for lr, final in ((3e-4, -2.0), (1e-3, -1.0), (3e-3, 0.5)):
        _fake_run(tmp_path, cell.at(lr, 1), [(-3.0, 1.6), (final, 1.7)])
    assert E.cell_lrs(cell, args) == ([3e-4, 1e-3, 3e-3, 1e-2], False)
    assert [c.lr for c in E.pending(args)] == [1e-2]


def test_report_counts_every_seed_and_opens_with_the_verdict(tmp_path: Path) -> None:
    """The page from fake runs with known envelopes: 7 seeds; the random control never
    reaches +1 on seed 7 (counted as circuit-tuning's win, not dropped); gradient is 0.10
    lower on the rest: Wilcoxon p = 2 / 2^7, Holm x 2 -> 0.03125, resolved. Against full the
    differences change sign: not resolved."""
    from experiment_page import write_page
    from experiment_report import collect

    args = E.parser().parse_args([
        "report", "--out", str(tmp_path / "runs"), "--models", "zoo:tiny-gpt2", "--groups",
        "1", "--seeds", "1-7", "--lrs", "1e-3,3e-3", "--max-extend", "0"])
    for seed in range(1, 8):
        ct = 1.70 + 0.01 * seed
        loss = {"gradient": ct, "random-parameters": None if seed == 7 else ct + 0.10,
                "full": 1.755}
        for mode, value in loss.items():
            cell = E.Cell("zoo:tiny-gpt2", 1, None if mode == "full" else 0.015, mode)
            _fake_run(Path(args.out), cell.at(3e-3, seed), _reaching(value))
            worse = None if value is None else value + 0.05  # lr 1e-3 is never picked
            _fake_run(Path(args.out), cell.at(1e-3, seed), _reaching(worse))
    results = collect(args)
    assert results["runs_done"] == results["runs_planned"] == 42
    headline = {c["control"]: c for c in results["comparisons"] if c["headline"]}
    vs_random = headline["random-parameters"]
    assert (vs_random["n"], vs_random["both"], vs_random["only_a"], vs_random["only_b"],
            vs_random["neither"]) == (7, 6, 1, 0, 0)
    assert vs_random["t"][0] == pytest.approx(-0.10)
    assert vs_random["wilcoxon"] == pytest.approx([0.0, 28.0, 2 / 128])
    assert vs_random["holm_p"] == pytest.approx(4 / 128)
    assert vs_random["verdict"] == "circuit-tuning lower"
    assert headline["full"]["verdict"] == "not resolved"
    gradient = next(c for c in results["cells"] if c["mode"] == "gradient")
    assert gradient["best_lrs"] == [3e-3] and gradient["best_on_edge"]
    assert gradient["envelope"]["1"]["picked_lrs"] == {"0.003": 7}
    write_page(results, [], tmp_path / "experiments.md")
    page = (tmp_path / "experiments.md").read_text()
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Summary and verdict"  # after the title and the question
    assert ("**Against the random circuit matched on trainable parameters:** circuit-tuning's "
            "general LM loss at target +1 was resolved lower in 1 of 1 headline cells "
            "(tiny-gpt2 (ungrouped)), higher in 0, not resolved in 0. Verdict: circuit-tuning "
            "kept the general LM loss lower than the random circuit matched on trainable "
            "parameters on every model and grouping tested.") in page
    assert "no difference from full fine-tuning was resolved" in page
    assert "**Caveat:** the best lr still sits on the edge of the grid" in page
    assert "| 7 | 6 / 1 / 0 / 0 | 7 / 0 |" in page  # n and how every seed entered


def _tiny(tmp_path: Path, mode: str) -> tuple[object, E.Condition]:
    args = E.parser().parse_args([
        "run", "--out", str(tmp_path / "grid"), "--steps", "4", "--eval-every", "2",
        "--batch-size", "4", "--n-examples", "16", "--n-train", "32", "--general-examples", "12"])
    return args, E.Condition("zoo:tiny-gpt2", 1, 0.05, mode, 1e-3, 3)


def _records(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        del r["wall_time"]
    return recs


@pytest.fixture
def one_thread():
    """Both paths run with one torch thread (float sums depend on the thread count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["gradient", "random-parameters"])
def test_cli_repeats_an_experiment_run_digit_for_digit(tmp_path: Path, mode: str,
                                                       capsys) -> None:
    """A run made by the experiment runner and the same run through `ctlens tune` (its
    `tune_argv`) write the same metrics.jsonl, wall times aside. Seed 3 differs from the data
    seed (0): the CLI's --seed must not resample the task."""
    import argparse

    from ctlens.cli import main
    from ctlens.cli.tune import add_tune_command, config_from_args

    args, cond = _tiny(tmp_path, mode)
    task = E.load_task(args)
    expected = E.run_one(cond, task, args)
    assert len(expected) == 3
    model = ctlens.load_model(cond.model)
    config = E.tune_config(cond, model, task, args)
    argv = E.tune_argv(config, cond, args, str(tmp_path / "cli"))
    parser = argparse.ArgumentParser()
    add_tune_command(parser.add_subparsers(dest="command"))
    assert config_from_args(parser.parse_args(argv)) == config
    assert "--data-seed" in argv and argv[argv.index("--seed") + 1] == "3"
    assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    assert _records(tmp_path / "cli") == _records(tmp_path / "grid" / cond.key)
    runs = [json.loads((d / "run.json").read_text()) for d in
            (tmp_path / "cli", tmp_path / "grid" / cond.key)]
    assert runs[0]["data"] == runs[1]["data"]  # the same task sample, tensor for tensor
    assert runs[0]["config"] == runs[1]["config"]


@pytest.mark.slow
def test_the_pipeline_end_to_end_on_a_tiny_grid(tmp_path: Path) -> None:
    """``experiment.py all`` on a tiny grid (2 seeds, one lr, short runs) in a temporary
    folder: the runs, the estimate, the JSON and a page that opens with its verdict."""
    out, docs = tmp_path / "runs", tmp_path / "docs"
    flags = ["--models", "zoo:tiny-gpt2", "--groups", "1", "--seeds", "1,2", "--lrs", "3e-3",
             "--steps", "6", "--eval-every", "3", "--n-examples", "16", "--n-train", "64",
             "--general-examples", "16", "--out", str(out), "--jobs", "2"]
    done = subprocess.run([sys.executable, str(BENCHMARKS / "experiment.py"), "all", *flags,
                           "--docs", str(docs), "--results", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "measuring one run per model" in done.stdout and "expected:" in done.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["runs_done"] == results["runs_planned"] == 6
    assert {(c["mode"], c["size"]) for c in results["conditions"]} == {
        ("full", None), ("gradient", 0.015), ("random-parameters", 0.015)}
    assert all(c["seeds"] == [1, 2] and c["model"] == "zoo:tiny-gpt2"
               for c in results["conditions"])
    headline = [c for c in results["comparisons"] if c["headline"]]
    assert len(headline) == 2 and all(c["n"] == 2 and "holm_p" in c for c in headline)
    page = (docs / "experiments.md").read_text().splitlines()
    assert page[0].startswith("# Experiments")
    assert [line for line in page if line.startswith("## ")][0] == "## Summary and verdict"
    assert any(line.startswith("**Against the random circuit") for line in page)
    again = subprocess.run([sys.executable, str(BENCHMARKS / "experiment.py"), "plan", *flags],
                           capture_output=True, text=True, timeout=600)
    assert "6 runs planned, 0 left" in again.stdout
