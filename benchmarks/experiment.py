"""The controlled circuit-tuning experiment (issues 12 and 20): every mode at every learning
rate, paired seeds, comparisons on the envelope over the learning rates.

Task ``agreement-flip`` (the paper's subject-verb *disagreement*) on the zoo models. A
*cell* is (model, MLP grouping, circuit size, mode); it runs at every lr of its mode's grid
(``--lrs`` for the AdamW modes, ``--paper-lrs`` for the SGD ``paper-*`` modes) on every
seed of ``--seeds`` (the seed sets the batch order and the random draws; the task sample
is the same for every run, ``--data-seed``). Modes: ``gradient`` and ``forward``
circuit-tuning, ``random-parameters`` and ``random-composition`` (a random circuit redrawn
every step with the trainable parameters, in total or per node kind, of the circuit
discovery selects at that step), ``lora`` (rank chosen so its adapters hold as many
parameters as the step-0 circuit of that size unlocks), ``full`` fine-tuning (no size, no
grouping), and ``paper-full``, ``paper-gradient`` and ``paper-random-parameters`` (the same
three under the circuit-tuning authors' options, `paper_options`).

**Grid extension.** A cell's *best lr* is the one the per-seed envelope picks at the middle
target threshold on the most seeds (when no seed reaches it at any lr: the lr with the
highest mean final target). When the best lr (or one tied for best) is the lowest or the
highest of the cell's grid, the grid gets the next lr beyond that edge on the 1-3 ladder
(..., 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, ...) for every seed, at most ``--max-extend`` times per
cell; the decision is made once every seed has finished every lr of the current grid (a
one-lr grid has no edge to extend).

The defaults are the headline grid: ``full``, ``gradient`` and ``random-parameters`` on
every zoo model, ungrouped and with 8 neuron groups, at 1.5 % of the edges, seeds 1-10.

Every run is a normal run directory under ``--out``; complete runs are reused, partial ones
resumed. ``all`` is the one command: it first finishes one run per model (a run of the grid,
kept) and prints the expected total from the measured times, then runs the rest in
``--jobs`` processes (again while extensions add runs), then writes the report (results
JSON, figures, docs/experiments.md). ``plan`` prints what is left and the estimate without
running anything; ``run --part I/N`` runs every N-th pending run; ``report`` only reports.
Any run repeats from the command line with the ``ctlens tune`` command `tune_argv` builds
(the same metrics.jsonl but for wall times; tested).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from experiment_stats import envelope_at  # noqa: E402

import ctlens  # noqa: E402
import ctlens.files  # noqa: E402
import ctlens.tasks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "experiment.json"
MODES = ("full", "gradient", "forward", "random-parameters", "random-composition", "lora",
         "paper-full", "paper-gradient", "paper-random-parameters")
HEADLINE_MODES = ("full", "gradient", "random-parameters")
PAPER = "paper-"  # mode prefix: the official code's options (`paper_options`)
THRESHOLDS = (0.0, 1.0, 2.0)
MIDDLE = THRESHOLDS[len(THRESHOLDS) // 2]
TASK = "agreement-flip"


@dataclass(frozen=True)
class Cell:
    """A condition of the grid before its lrs and seeds: what the envelope is taken over."""

    model: str
    groups: int
    size: float | None  # fraction of valid edges; None for full fine-tuning
    mode: str

    def at(self, lr: float, seed: int) -> Condition:
        """The run of this cell at ``lr`` and ``seed``."""
        return Condition(self.model, self.groups, self.size, self.mode, lr, seed)


@dataclass(frozen=True)
class Condition:
    """One run: a cell at one learning rate and seed."""

    model: str
    groups: int
    size: float | None
    mode: str
    lr: float
    seed: int

    @property
    def key(self) -> str:
        size = "all" if self.size is None else f"{self.size:g}"
        return (f"{self.model.removeprefix('zoo:')}-g{self.groups}-n{size}-{self.mode}"
                f"-lr{self.lr:g}-s{self.seed}")

    @property
    def cell(self) -> Cell:
        return Cell(self.model, self.groups, self.size, self.mode)


def is_full(mode: str) -> bool:
    """Full fine-tuning (no circuit size): ``full`` and ``paper-full``."""
    return mode.removeprefix(PAPER) == "full"


def reference_mode(mode: str) -> str:
    """The full fine-tuning a mode is compared with (same options)."""
    return PAPER + "full" if mode.startswith(PAPER) else "full"


def paper_options() -> dict[str, Any]:
    """The circuit-tuning authors' official setting: top-nodes selection, SGD with momentum
    0.9 and weight decay 1e-4, LM loss on every token of the training sentence."""
    return {"selection": "top_nodes", "optimizer": "sgd", "momentum": 0.9,
            "weight_decay": 1e-4, "loss": "sequence"}


def parse_seeds(text: str) -> list[int]:
    """``"1-10"`` or ``"1,2,5"`` (or a mix: ``"1-3,7"``) -> the seeds, in order."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


def grid_lrs(args: argparse.Namespace, mode: str) -> list[float]:
    """The base learning-rate grid of ``mode`` (SGD needs larger ones than AdamW)."""
    return sorted(float(x) for x in (args.paper_lrs if mode.startswith(PAPER) else args.lrs)
                  .split(","))


LADDER = tuple(float(f"{m}e{e}") for e in range(-8, 3) for m in (1, 3))
"""Learning rates the grid extends along: ..., 1e-4, 3e-4, 1e-3, 3e-3, ..."""


def next_lr(lr: float, up: bool) -> float:
    """The ladder's next lr beyond ``lr`` (more than 1.5x away)."""
    if up:
        return min(x for x in LADDER if x > 1.5 * lr)
    return max(x for x in LADDER if x < lr / 1.5)


def cells(args: argparse.Namespace) -> list[Cell]:
    """The grid's cells in run order: per model, full fine-tuning first (the reference),
    then each grouping and size, LoRA last."""
    out = []
    modes = args.modes.split(",")
    for model in args.models.split(","):
        out += [Cell(model, 1, None, m) for m in modes if is_full(m)]
        for late in (False, True):
            out += [Cell(model, g, float(size), m)
                    for g in (int(x) for x in args.groups.split(","))
                    for size in args.sizes.split(",")
                    for m in modes if not is_full(m) and (m == "lora") == late]
    return out


def records(run: Path, steps: int) -> list[dict[str, Any]] | None:
    """The run's metrics records when it is complete, else ``None``."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
    except (OSError, json.JSONDecodeError):
        return None
    return recs if recs and recs[-1]["step"] == steps else None


def points(recs: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    return [(r["step"], r["target_metric"], r["general_loss"]) for r in recs]


def best_lrs(runs: dict[float, dict[int, list[dict[str, Any]]]]) -> set[float]:
    """The lrs tied for best (module docstring) among ``runs`` (lr -> seed -> records)."""
    seeds = set.intersection(*(set(by_seed) for by_seed in runs.values()))
    lrs = sorted(runs)
    picks: Counter[float] = Counter()
    for seed in seeds:
        hit = envelope_at([points(runs[lr][seed]) for lr in lrs], MIDDLE)
        if hit is not None:
            picks[lrs[hit[1]]] += 1
    if picks:
        top = max(picks.values())
        return {lr for lr, n in picks.items() if n == top}
    final = {lr: sum(runs[lr][s][-1]["target_metric"] for s in seeds) / len(seeds) for lr in lrs}
    return {max(final, key=final.__getitem__)}


def cell_lrs(cell: Cell, args: argparse.Namespace) -> tuple[list[float], bool]:
    """(the cell's lrs now, whether they are final): the base grid plus the extensions
    decided from finished runs (module docstring)."""
    base = lrs = grid_lrs(args, cell.mode)
    seeds = parse_seeds(args.seeds)
    while True:
        runs: dict[float, dict[int, list[dict[str, Any]]]] = {}
        for lr in lrs:
            for seed in seeds:
                recs = records(Path(args.out) / cell.at(lr, seed).key, args.steps)
                if recs is None:
                    return lrs, False
                runs.setdefault(lr, {})[seed] = recs
        if len(lrs) - len(base) >= args.max_extend or len(lrs) == 1:
            return lrs, True  # no extension left, or no edge to extend (one lr)
        best = best_lrs(runs)
        if lrs[0] in best:
            lrs = [next_lr(lrs[0], up=False), *lrs]
        elif lrs[-1] in best:
            lrs = [*lrs, next_lr(lrs[-1], up=True)]
        else:
            return lrs, True


def planned(args: argparse.Namespace) -> list[Condition]:
    """Every run of the grid as it stands (base grids plus decided extensions)."""
    out = []
    for cell in cells(args):
        lrs, _ = cell_lrs(cell, args)
        out += [cell.at(lr, seed) for lr in lrs for seed in parse_seeds(args.seeds)]
    return out


def pending(args: argparse.Namespace) -> list[Condition]:
    """The planned runs that are not complete (partial ones resume)."""
    return [c for c in planned(args) if records(Path(args.out) / c.key, args.steps) is None]


def load_task(args: argparse.Namespace) -> Any:
    """The experiment's task sample: the same for every run (``--data-seed``)."""
    return ctlens.tasks.load(TASK, n=args.n, n_train=args.n_train, seed=args.data_seed,
                             n_general=args.general_examples)


def _n_edges(model: Any, groups: int) -> int:
    return ctlens.Graph.from_model(model, mlp_groups=groups).n_edges


def lora_rank(model: Any, task: Any, top_n: int, groups: int) -> tuple[int, int]:
    """(rank, budget): LoRA rank whose adapters best match the parameters the step-0
    circuit of ``top_n`` edges unlocks (EAP, mean ablation, on the discovery pairs)."""
    from ctlens.tuning.controls import trainable_count
    from ctlens.tuning.lora import LoraBackend

    graph = ctlens.Graph.from_model(model, mlp_groups=groups)
    scores = ctlens.attribute(model, task.discovery, ablation="mean", progress=False,
                              graph=graph)
    circuit = ctlens.Circuit.from_scores(scores, top_n=top_n)
    budget = trainable_count(model, circuit, ctlens.TuneConfig())
    per_rank = sum(p.numel() for p in LoraBackend(model, 1, 2.0).parameters())
    return max(1, round(budget / per_rank)), budget


def tune_config(cond: Condition, model: Any, task: Any, args: argparse.Namespace) -> Any:
    """The `TuneConfig` of run ``cond``."""
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
        eval_examples=args.n, general_examples=args.general_examples, progress=False,
        seed=cond.seed, **extra)


def tune_argv(config: Any, cond: Condition, args: argparse.Namespace, out: str) -> list[str]:
    """The ``ctlens tune`` arguments that repeat run ``cond`` (with ``config``) in ``out``:
    the same model, task sample, threads and every config field that differs from the
    default."""
    argv = ["tune", "--model", cond.model, "--task", TASK, "--n-examples", str(args.n),
            "--n-train", str(args.n_train), "--data-seed", str(args.data_seed),
            "--threads", str(args.threads), "--out", out]
    default = ctlens.TuneConfig()
    for f in fields(config):
        value = getattr(config, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, "none" if value is None else str(value)]
    return argv


def run_one(cond: Condition, task: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run ``cond`` (reused when complete, resumed when partial); its records."""
    out = Path(args.out) / cond.key
    done = records(out, args.steps)
    if done is not None:
        return done
    model = ctlens.load_model(cond.model)
    cfg = tune_config(cond, model, task, args)
    start = time.time()
    ctlens.CircuitTuner(model, task, cfg, model_name=cond.model).run(out)
    print(f"{cond.key}: {time.time() - start:.0f} s", flush=True)
    return records(out, args.steps) or []


def run(args: argparse.Namespace) -> None:
    """Run every N-th pending run from the I-th (``--part I/N``), or those of ``--queue``."""
    torch.set_num_threads(args.threads)
    part, n_parts = (int(x) for x in args.part.split("/"))
    if args.queue:
        todo = [Condition(**c) for c in json.loads(Path(args.queue).read_text())]
    else:
        todo = pending(args)
    task = load_task(args)
    for cond in todo[part::n_parts]:
        run_one(cond, task, args)


def seconds_per_run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Mean wall time of the finished runs (training and evaluations, from their last
    record), by model and mode."""
    times: dict[tuple[str, str], list[float]] = {}
    for cond in planned(args):
        recs = records(Path(args.out) / cond.key, args.steps)
        if recs is not None:
            times.setdefault((cond.model, cond.mode), []).append(recs[-1]["wall_time"])
    out: dict[str, dict[str, float]] = {}
    for (model, mode), values in times.items():
        out.setdefault(model, {})[mode] = sum(values) / len(values)
    return out


def estimate(args: argparse.Namespace, todo: list[Condition]) -> str:
    """A table of the runs left per model and their expected time, from `seconds_per_run`
    (a mode not yet measured takes its model's slowest measured mode)."""
    measured = seconds_per_run(args)
    lines = [f"{'model':22s} {'runs left':>9s} {'s/run (by mode)':>40s} {'hours':>7s}"]
    total = 0.0
    unmeasured = []
    for model in args.models.split(","):
        mine = [c for c in todo if c.model == model]
        per_mode = measured.get(model, {})
        if not per_mode:
            lines.append(f"{model:22s} {len(mine):9d} {'not measured':>40s}")
            unmeasured.append(model)
            continue
        seconds = sum(per_mode.get(c.mode, max(per_mode.values())) for c in mine)
        total += seconds
        shown = ", ".join(f"{m} {s:.0f}" for m, s in sorted(per_mode.items()))
        lines.append(f"{model:22s} {len(mine):9d} {shown:>40s} {seconds / 3600:7.2f}")
    if unmeasured:
        lines.append(f"expected: unknown until one run of {', '.join(unmeasured)} has finished "
                     "(`all` measures one run per model first)")
        return "\n".join(lines)
    lines.append(f"expected: {total / 3600:.2f} h of one core, {total / 3600 / args.jobs:.2f} h "
                 f"with {args.jobs} processes (plus model loading; more if a best lr sits on a "
                 f"grid edge: up to {args.max_extend} more lrs per cell)")
    return "\n".join(lines)


def _spawn(args: argparse.Namespace, todo: list[Condition]) -> None:
    """Run ``todo`` in ``--jobs`` processes (a queue file, every N-th run each)."""
    if not todo:
        return
    queue = Path(args.out) / "queue.json"
    queue.parent.mkdir(parents=True, exist_ok=True)
    ctlens.files.atomic_write_text(queue, json.dumps([asdict(c) for c in todo]))
    flags = [*grid_flags(args), "--out", args.out, "--queue", str(queue)]
    procs = [subprocess.Popen([sys.executable, __file__, "run", *flags, "--part",
                               f"{i}/{args.jobs}"]) for i in range(min(args.jobs, len(todo)))]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a run process failed; its output is above (finished runs are kept)")


def _all(args: argparse.Namespace) -> None:
    """Measure one run per model, print the expected total, run the rest (repeating while
    extensions add runs), then write the report."""
    measured = seconds_per_run(args)
    todo = pending(args)
    probes = []
    for model in args.models.split(","):
        mine = [c for c in todo if c.model == model]
        if model not in measured and mine:
            probes.append(next((c for c in mine if c.mode == "gradient"), mine[0]))
    if probes:
        print(f"measuring one run per model: {', '.join(c.key for c in probes)}", flush=True)
        _spawn(args, probes)
    while todo := pending(args):
        print(estimate(args, todo), flush=True)
        _spawn(args, todo)
    _report(args)


def _plan(args: argparse.Namespace) -> None:
    """Print the runs left and the expected time (runs nothing)."""
    todo = pending(args)
    print(f"{len(planned(args))} runs planned, {len(todo)} left")
    print(estimate(args, todo))


def _report(args: argparse.Namespace) -> None:
    from experiment_report import report

    report(args)


GRID_FLAGS = ("models", "groups", "sizes", "modes", "seeds", "lrs", "paper_lrs", "max_extend",
              "headline_size", "steps", "batch_size", "eval_every", "n", "general_examples",
              "n_train", "data_seed", "threads")


_FLAG = {"n": "--n-examples"}
"""Flags not spelled like their argument's name."""


def grid_flags(args: argparse.Namespace) -> list[str]:
    """The flags that define the grid (what the page prints as its command)."""
    return [x for k in GRID_FLAGS for x in (_FLAG.get(k, f"--{k.replace('_', '-')}"),
                                             str(getattr(args, k)))]


def parser() -> argparse.ArgumentParser:
    """The command line (``run``, ``plan``, ``report``, ``all``; the same grid flags each)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    zoo = ",".join(f"zoo:{name}" for name in ("tiny-gpt2", "tiny-llama", "mini-gpt2"))
    for name, func in (("run", run), ("plan", _plan), ("report", _report), ("all", _all)):
        s = sub.add_parser(name)
        s.set_defaults(func=func)
        s.add_argument("--models", default=zoo)
        s.add_argument("--groups", default="1,8",
                       help="MLP neuron groups per MLP (1: ungrouped), comma-separated")
        s.add_argument("--sizes", default="0.015",
                       help="circuit sizes as fractions of the valid edges")
        s.add_argument("--modes", default=",".join(HEADLINE_MODES), help=f"of {', '.join(MODES)}")
        s.add_argument("--seeds", default="1-10", help="paired seeds, e.g. 1-10 or 1,2,5")
        s.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="lr grid of the AdamW modes")
        s.add_argument("--paper-lrs", default="3e-2,1e-1,3e-1",
                       help="lr grid of the paper-* modes (SGD)")
        s.add_argument("--max-extend", type=int, default=2,
                       help="lrs a cell's grid may grow by where its best lr sits on an edge")
        s.add_argument("--headline-size", type=float, default=0.015,
                       help="circuit size of the headline cells (Holm-corrected)")
        s.add_argument("--steps", type=int, default=60)
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--eval-every", type=int, default=5)
        s.add_argument("--n-examples", dest="n", type=int, default=48,
                       help="examples per discovery and evaluation set")
        s.add_argument("--n", dest="n", type=int, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)  # the old spelling, as in ctlens tune
        s.add_argument("--general-examples", type=int, default=128,
                       help="held-out general-corpus rows of the general LM loss")
        s.add_argument("--n-train", type=int, default=1024)
        s.add_argument("--data-seed", type=int, default=0, help="seed of the task sample")
        s.add_argument("--out", default="/tmp/ctlens-experiment")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--jobs", type=int, default=2, help="run processes in parallel")
    sub.choices["run"].add_argument("--part", default="0/1", help="I/N: every N-th run from I")
    sub.choices["run"].add_argument("--queue", default=None,
                                    help="a JSON list of runs to take the part from")
    for name in ("report", "all"):
        sub.choices[name].add_argument("--note", default="",
                                       help="what was cut and why (printed in the page)")
        sub.choices[name].add_argument("--docs", default=str(ROOT / "docs"),
                                       help="where experiments.md and img/ are written")
        sub.choices[name].add_argument("--results", default=str(RESULTS),
                                       help="the results JSON to write")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.max_extend < 0:
        p.error("--max-extend must be >= 0")
    args.func(args)


if __name__ == "__main__":
    main()
