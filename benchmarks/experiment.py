"""The controlled circuit-tuning experiment (issue 12): seeds, intervals, matched controls.

Task ``agreement-flip`` (the paper's subject-verb *disagreement*) on the zoo models. Every
condition (model, MLP grouping, circuit size, mode) runs over ``--seeds``; comparisons are at
matched target (see ``experiment_stats``). Modes: ``gradient`` and ``forward``
circuit-tuning, ``random-parameters`` and ``random-composition`` (a random circuit redrawn
every step with the trainable parameters, in total or per node kind, of the circuit
discovery selects at that step), ``lora`` (rank chosen so its adapters hold as many
parameters as the step-0 circuit of that size unlocks), and ``full`` fine-tuning (no size).
``paper-full``, ``paper-gradient`` and ``paper-random-parameters`` are the same three under
the circuit-tuning authors' official options (`paper_options`: top-nodes selection, SGD with
momentum, sequence loss), with their own learning-rate sweep (``--paper-lrs``).

Learning rates: for each model and mode, one run per ``--lrs`` value on ``--sweep-seed``
(not among the reported seeds), at ``--sweep-size``, ungrouped; the chosen lr is the one with
the lowest general LM loss where the target first reaches the middle threshold (if no lr
reaches it: the highest final target). That lr is then used for every size and grouping.

Every run is a normal run directory under ``--out``; re-running skips complete runs and
resumes partial ones. ``--part I/N`` runs every N-th job from the I-th (the jobs are
independent and deterministic; a part waits for the learning-rate sweep of the others).

Run::

    python benchmarks/experiment.py all --jobs 2   # the runs in 2 processes, then the report

or by hand: ``run --part 0/2 & run --part 1/2``, then ``report`` (results JSON, figures,
docs/experiments.md), each with the same flags.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experiment_stats import crossing  # noqa: E402

import ctlens  # noqa: E402
import ctlens.tasks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "experiment.json"
MODES = ("full", "gradient", "forward", "random-parameters", "random-composition", "lora",
         "paper-full", "paper-gradient", "paper-random-parameters")
PAPER = "paper-"  # mode prefix: the official code's options (`paper_options`)
THRESHOLDS = (0.0, 1.0, 2.0)


@dataclass(frozen=True)
class Condition:
    """One run: a condition of the grid at one seed and learning rate."""

    model: str
    groups: int
    size: float | None  # fraction of valid edges; None for full fine-tuning
    mode: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        size = "all" if self.size is None else f"{self.size:g}"
        return (f"{self.model.removeprefix('zoo:')}-g{self.groups}-n{size}-{self.mode}"
                f"-lr{self.lr:g}-s{self.seed}")


def is_full(mode: str) -> bool:
    """Full fine-tuning (no circuit size): ``full`` and ``paper-full``."""
    return mode.removeprefix(PAPER) == "full"


def reference_mode(mode: str) -> str:
    """The full fine-tuning a mode's area is measured against (same options)."""
    return PAPER + "full" if mode.startswith(PAPER) else "full"


def paper_options() -> dict[str, Any]:
    """The circuit-tuning authors' official setting: top-nodes selection, SGD with momentum
    0.9 and weight decay 1e-4, LM loss on every token of the training sentence."""
    return {"selection": "top_nodes", "optimizer": "sgd", "momentum": 0.9,
            "weight_decay": 1e-4, "loss": "sequence"}


def lrs_for(args: argparse.Namespace, mode: str) -> list[float]:
    """The learning rates swept for ``mode`` (SGD needs larger ones than AdamW)."""
    return [float(x) for x in (args.paper_lrs if mode.startswith(PAPER) else args.lrs)
            .split(",")]


def _grid_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "models": args.models.split(","), "groups": [int(g) for g in args.groups.split(",")],
        "sizes": [float(s) for s in args.sizes.split(",")], "modes": args.modes.split(","),
        "seeds": [int(s) for s in args.seeds.split(",")],
    }


def sweep_conditions(args: argparse.Namespace) -> list[Condition]:
    g = _grid_args(args)
    return [Condition(m, 1, None if is_full(mode) else args.sweep_size, mode, lr,
                      args.sweep_seed)
            for m in g["models"] for mode in g["modes"] for lr in lrs_for(args, mode)]


def main_conditions(args: argparse.Namespace, lr_of: Any) -> list[Condition]:
    """The reported grid: full fine-tuning (every area's reference), then size by size the
    other modes, LoRA last (so an interrupted grid has whole conditions)."""
    g = _grid_args(args)
    out = []
    for m in g["models"]:
        out += [Condition(m, 1, None, mode, lr_of(m, mode), s)
                for mode in g["modes"] if is_full(mode) for s in g["seeds"]]
        late = [x for x in g["modes"] if x == "lora"]
        for modes in ([x for x in g["modes"] if not is_full(x) and x != "lora"], late):
            for groups in g["groups"]:
                for size in g["sizes"]:
                    out += [Condition(m, groups, size, mode, lr_of(m, mode), s)
                            for mode in modes for s in g["seeds"]]
    return out


def jobs(args: argparse.Namespace) -> list[tuple[str, Condition]]:
    """Every run in the order they start: the learning-rate sweeps first, LoRA's (sweep and
    runs) last. ``("main", c)`` jobs carry lr NaN: their lr comes from the sweep when run."""
    sweep = sweep_conditions(args)
    main = main_conditions(args, lambda m, mode: float("nan"))
    early = [("sweep", c) for c in sweep if c.mode != "lora"] + \
        [("main", c) for c in main if c.mode != "lora"]
    return early + [("sweep", c) for c in sweep if c.mode == "lora"] + \
        [("main", c) for c in main if c.mode == "lora"]


def _supports_groups() -> bool:
    return "mlp_groups" in ctlens.TuneConfig.__dataclass_fields__


def _n_edges(model: Any, groups: int) -> int:
    if groups == 1:
        return ctlens.Graph.from_model(model).n_edges
    return ctlens.Graph.from_model(model, mlp_groups=groups).n_edges


def lora_rank(model: Any, task: Any, top_n: int, groups: int) -> tuple[int, int]:
    """(rank, budget): LoRA rank whose adapters best match the parameters the step-0
    circuit of ``top_n`` edges unlocks (EAP, mean ablation, on the discovery pairs)."""
    from ctlens.tuning.controls import trainable_count
    from ctlens.tuning.lora import LoraBackend

    graph = ctlens.Graph.from_model(model, **({"mlp_groups": groups} if groups > 1 else {}))
    scores = ctlens.attribute(model, task.discovery, ablation="mean", progress=False,
                              graph=graph)
    circuit = ctlens.Circuit.from_scores(scores, top_n=top_n)
    budget = trainable_count(model, circuit, ctlens.TuneConfig())
    per_rank = sum(p.numel() for p in LoraBackend(model, 1, 2.0).parameters())
    return max(1, round(budget / per_rank)), budget


def tune_config(cond: Condition, model: Any, task: Any, args: argparse.Namespace) -> Any:
    extra: dict[str, Any] = {}
    top_n = 1
    if cond.size is not None:
        top_n = max(1, round(cond.size * _n_edges(model, cond.groups)))
    if cond.groups > 1:
        extra["mlp_groups"] = cond.groups
    mode = cond.mode
    if mode.startswith(PAPER):
        mode = mode.removeprefix(PAPER)
        extra.update(paper_options())
    if mode.startswith("random-"):
        mode, extra["random_match"] = "random", mode.removeprefix("random-")
    if mode == "lora":
        rank, _ = lora_rank(model, task, top_n, cond.groups)
        extra.update(lora_rank=rank, lora_alpha=2.0 * rank)
    return ctlens.TuneConfig(
        mode=mode, lr=cond.lr, top_n=top_n, every_k=1, steps=args.steps,
        batch_size=args.batch_size, eval_every=args.eval_every, save_every=args.steps,
        eval_examples=args.n, progress=False, seed=cond.seed, **extra)


def records(run: Path, steps: int) -> list[dict[str, Any]] | None:
    """The run's metrics records when it is complete, else ``None``."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
    except (OSError, json.JSONDecodeError):
        return None
    return recs if recs and recs[-1]["step"] == steps else None


def run_one(cond: Condition, task: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run ``cond`` (skipped when complete, resumed when partial); its records."""
    out = Path(args.out) / cond.key
    done = records(out, args.steps)
    if done is not None:
        return done
    if cond.groups > 1 and not _supports_groups():
        raise SystemExit("this ctlens has no TuneConfig.mlp_groups: run with --groups 1")
    model = ctlens.load_model(cond.model)
    cfg = tune_config(cond, model, task, args)
    start = time.time()
    ctlens.CircuitTuner(model, task, cfg, model_name=cond.model).run(out)
    print(f"{cond.key}: {time.time() - start:.0f} s", flush=True)
    return records(out, args.steps) or []


def choose_lr(runs: dict[float, list[dict[str, Any]]]) -> float:
    """The sweep's rule (module docstring): lowest general loss at the middle threshold."""
    middle = THRESHOLDS[len(THRESHOLDS) // 2]
    crossed = {}
    for lr, recs in runs.items():
        hit = crossing(points(recs), middle)
        if hit is not None:
            crossed[lr] = hit[1]
    if crossed:
        return min(crossed, key=lambda lr: crossed[lr])
    return max(runs, key=lambda lr: runs[lr][-1]["target_metric"])


def points(recs: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    return [(r["step"], r["target_metric"], r["general_loss"]) for r in recs]


def sweep_lrs(args: argparse.Namespace, wait: bool,
              only: tuple[str, str] | None = None) -> dict[tuple[str, str], float]:
    """Chosen lr per (model, mode) (``only``: that pair); waits for other parts' sweep runs
    when ``wait``."""
    chosen: dict[tuple[str, str], float] = {}
    by: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = {}
    for cond in sweep_conditions(args):
        if only is not None and (cond.model, cond.mode) != only:
            continue
        while True:
            recs = records(Path(args.out) / cond.key, args.steps)
            if recs is not None or not wait:
                break
            time.sleep(10)
        if recs is not None:
            by.setdefault((cond.model, cond.mode), {})[cond.lr] = recs
    for key, runs in by.items():
        if len(runs) == len(lrs_for(args, key[1])):
            chosen[key] = choose_lr(runs)
    return chosen


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    part, n_parts = (int(x) for x in args.part.split("/"))
    task = ctlens.tasks.load("agreement-flip", n=args.n, n_train=args.n_train, seed=0)
    for i, (kind, cond) in enumerate(jobs(args)):
        if i % n_parts != part:
            continue
        if kind == "main":
            lr = sweep_lrs(args, wait=True, only=(cond.model, cond.mode))[(cond.model, cond.mode)]
            cond = replace(cond, lr=lr)
        run_one(cond, task, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("run", "report", "all"):
        p = sub.add_parser(name)
        p.add_argument("--models", default="zoo:tiny-gpt2,zoo:tiny-llama")
        p.add_argument("--groups", default="1,8",
                       help="MLP neuron groups per MLP (1: ungrouped), comma-separated")
        p.add_argument("--sizes", default="0.015,0.04,0.15",
                       help="circuit sizes as fractions of the valid edges")
        p.add_argument("--modes", default=",".join(MODES))
        p.add_argument("--seeds", default="1,2,3", help="reported seeds")
        p.add_argument("--sweep-size", type=float, default=0.04,
                       help="circuit size (fraction of edges) of the learning-rate sweep")
        p.add_argument("--sweep-seed", type=int, default=0,
                       help="seed of the learning-rate sweep (not a reported seed)")
        p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="learning rates of the sweep")
        p.add_argument("--paper-lrs", default="3e-2,1e-1,3e-1",
                       help="learning rates of the sweep for the paper-* modes (SGD)")
        p.add_argument("--steps", type=int, default=60)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--eval-every", type=int, default=5)
        p.add_argument("--n-examples", dest="n", type=int, default=48,
                       help="examples per evaluation set")
        p.add_argument("--n", dest="n", type=int, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)  # the old spelling, as in ctlens tune
        p.add_argument("--n-train", type=int, default=1024)
        p.add_argument("--out", default="/tmp/ctlens-experiment")
        p.add_argument("--threads", type=int, default=1)
    sub.choices["run"].add_argument("--part", default="0/1", help="I/N: every N-th job from I")
    sub.choices["run"].set_defaults(func=run)
    for name in ("report", "all"):
        sub.choices[name].add_argument("--note", default="",
                                       help="what was cut and why (printed in the page)")
    sub.choices["report"].set_defaults(func=_report)
    sub.choices["all"].add_argument("--jobs", type=int, default=2,
                                    help="run processes in parallel (one --part each)")
    sub.choices["all"].set_defaults(func=_all)
    args = parser.parse_args(argv)
    if set(args.seeds.split(",")) & {str(args.sweep_seed)}:
        parser.error("--sweep-seed must not be one of --seeds")
    args.func(args)


GRID_FLAGS = ("models", "groups", "sizes", "modes", "seeds", "sweep_seed", "sweep_size", "lrs",
              "paper_lrs", "steps", "batch_size", "eval_every", "n", "n_train", "threads")


_FLAG = {"n": "--n-examples"}
"""Flags not spelled like their argument's name."""


def grid_flags(args: argparse.Namespace) -> list[str]:
    """The flags that define the grid (what the page prints as its command)."""
    return [x for k in GRID_FLAGS for x in (_FLAG.get(k, f"--{k.replace('_', '-')}"),
                                             str(getattr(args, k)))]


def _all(args: argparse.Namespace) -> None:
    """``run`` in ``--jobs`` processes (``--part i/jobs``), then ``report``: the page from
    one command."""
    flags = [*grid_flags(args), "--out", args.out]
    procs = [subprocess.Popen([sys.executable, __file__, "run", *flags, "--part",
                               f"{i}/{args.jobs}"]) for i in range(args.jobs)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a run process failed; its output is above (finished runs are kept)")
    _report(args)


def _report(args: argparse.Namespace) -> None:
    from experiment_report import report

    report(args)


if __name__ == "__main__":
    main()
