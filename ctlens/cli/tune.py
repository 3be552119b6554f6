"""``ctlens tune``: a circuit-tuning run from the command line.

``ctlens.cli`` calls `add_tune_command` with its sub-parser collection. Every
`TuneConfig` field has an option (``top_n`` -> ``--top-n``; booleans as ``--x/--no-x``;
``none`` for optional numbers), so the command and the Python API cannot drift apart::

    ctlens tune --model zoo:tiny-gpt2 --task agreement-flip --mode gradient --top-n 300 \\
        --every-k 1 --steps 200 --out runs/flip

Running the same command again on its ``--out`` directory resumes the run. ``--circuit
FILE`` tunes inside a fixed circuit from a file (found by any method, e.g. ``ctlens discover
--method learned --out FILE``) instead of rediscovering; with ``--mode random``, inside one
random circuit matched to it (``--random-match``, parameters by default). ``--spans`` makes
the run positional (`TuneConfig`'s ``spans``); a positional ``--circuit`` file needs it, and
its spans must be the task's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from ctlens.cli.support import (
    DEFAULT_MODEL,
    UsageError,
    add_n_examples,
    check_model_and_task,
    memory_size,
    phase,
)
from ctlens.dir_lock import DirLock
from ctlens.run_format import RUN_LOCK_HOLDER
from ctlens.sizes import parse_size
from ctlens.tuning.config import APPLIES_ONLY, TuneConfig
from ctlens.types import Mode

DEFAULT_TASK = "agreement-flip"
"""``ctlens discover``'s default task (agreement) with the answers swapped: the paper's
subject-verb disagreement experiment."""
GENERAL_ROWS = 128
"""The task's general-corpus rows with ``--general-examples none`` (the tasks' default)."""

_HELP: dict[str, str] = {
    "mode": "gradient (the paper's), forward, both; baselines full, random, lora",
    "random_match": "what --mode random's circuit shares with the discovered one: parameters, "
    "composition (per node kind) or edges",
    "top_n": "edges in the circuit (the final N when a schedule is used): a count, or a "
    "fraction of the valid edges such as 0.01",
    "top_n_start": "first N of the schedule (default: --top-n), a count or a fraction",
    "mlp_groups": "split each MLP into this many neuron groups (nodes m{l}.n{j})",
    "mlp_group_size": "neurons per MLP group instead of --mlp-groups (the paper's Llama: 64)",
    "top_n_schedule": "N schedule from --top-n-start to --top-n",
    "every_k": "re-discover the circuit every K optimizer steps",
    "discovery": "batch: EAP on the training batch (paper); task: on the discovery pairs",
    "batch_metric": "what batch discovery differentiates: the task metric or minus the loss",
    "discovery_ablation": "ablation for --discovery task",
    "discovery_batches": "batches of discovery pairs per task discovery",
    "max_memory": "memory budget of task discovery's attribution, e.g. 8GB (default: half "
    "of what is free on the device)",
    "ema": "moving average of scores across rediscoveries (0: off)",
    "selection": "top_n: largest |score|; top_nodes: |score| x both ends' summed |scores| (paper)",
    "spans": "positional circuits: score, select and mask (edge, token span) pairs over the "
    "task's spans; --top-n counts pairs",
    "optimizer": "adamw, or sgd with --momentum (the paper's official code)",
    "loss": "target: NLL of the target tokens; sequence: of every token of the row (paper)",
    "momentum": "SGD momentum (--optimizer sgd)",
    "train_embeddings": "let the input node's embeddings move when in the circuit",
    "train_unembedding": "let the logits node's unembedding move when in the circuit",
    "steps": "optimizer steps",
    "batch_size": "training rows per step (global, across ranks)",
    "lr": "learning rate",
    "weight_decay": "weight decay (AdamW's decoupled, or SGD's)",
    "betas": "AdamW betas (--optimizer adamw)",
    "grad_clip": "gradient-norm clipping (none: off)",
    "lr_schedule": "learning-rate decay after warm-up",
    "warmup_steps": "linear warm-up steps",
    "metric_beta": "add beta * |task metric| to the loss (the paper's de-biasing term)",
    "lora_rank": "LoRA rank (--mode lora)",
    "lora_alpha": "LoRA alpha (--mode lora)",
    "shard": "fsdp: shard weights, gradients and optimizer state with FSDP2 (under torchrun; "
             "any --mode but lora)",
    "precision": "fp32, or bf16 / fp16: the training forward under autocast (fp32 weights, "
                 "loss and scores; fp16 with a loss scaler)",
    "checkpoint_format": "safetensors: consolidated weights (gathered); dcp: "
                         "torch.distributed.checkpoint, each rank writes its own shard",
    "eval_every": "evaluate (metrics.jsonl + circuit snapshot) every N steps",
    "eval_examples": "examples per evaluation set (none: all)",
    "general_examples": "held-out general-corpus rows the general LM loss is measured on, "
    "a setting of its own (none: the task's 128)",
    "save_every": "checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept on disk",
    "seed": "seed of the batch order and the random draws (random circuits); the task "
    "sample has its own, --data-seed",
    "export": "write the tuned model as an HF directory RUN/model at the end",
    "progress": "show a progress bar",
}


def add_tune_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``ctlens tune`` on ``subparsers``; returns its parser."""
    p = subparsers.add_parser(
        "tune",
        help="circuit-tune a model on a task (resumes when --out holds the same run)",
        description="Fine-tune a model only inside its task circuit, rediscovered every K "
        "steps (arXiv 2502.06106), or run a baseline (full, random, lora). Writes a run "
        "directory (docs/run-format.md): run.json, metrics.jsonl, circuits/, checkpoints/, "
        "model/. Running the same command again resumes from the last checkpoint.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="zoo:NAME, a local HF model directory or a hub name; ctlens discover "
                   "starts from the same model")
    p.add_argument("--task", default=DEFAULT_TASK,
                   help="a built-in task (ctlens tasks lists them) or a JSONL file; "
                   "agreement-flip tunes towards the wrong verb number (the paper's experiment) "
                   "on the circuit ctlens discover finds for agreement")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different run in --out (only the run's own files)")
    add_n_examples(p, 256, "examples per discovery and evaluation set")
    p.add_argument("--n-train", type=int, default=1024, help="training rows")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of the task sample (discovery, training, evaluation and general "
                        "rows), separate from --seed")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else physical cores "
                   "minus one, at least 1)")
    p.add_argument("--circuit", default=None, metavar="FILE",
                   help="tune inside this fixed circuit (a circuit file, from any method: "
                   "ctlens discover, --method learned, an MIB import) instead of discovering "
                   "one; the --top-n schedule, --every-k and discovery options then go unused. "
                   "With --mode random: inside one random circuit matched to it "
                   "(--random-match). A positional circuit file (with span names) needs "
                   "--spans and the task's spans")
    hints = typing.get_type_hints(TuneConfig)
    for field in dataclasses.fields(TuneConfig):
        _add_field(p, field, hints[field.name])
    p.set_defaults(func=run_tune, out_kind="dir", check=check_tune)
    return p


def check_tune(args: argparse.Namespace) -> None:
    """What ``ctlens tune`` can refuse before torch is imported: the model and task names,
    and (without ``--overwrite``) an ``--out`` holding a run of another model, task, config
    or, for a built-in task, size (``--n-examples``, ``--n-train``). The tuner checks the
    same again, with the graph and the data's checksums, once they exist. Also a
    ``--circuit`` that is no file, or given with a mode that has no circuit."""
    check_model_and_task(args)
    if args.circuit is not None:
        if not Path(args.circuit).is_file():
            raise UsageError(f"--circuit {args.circuit}: no such file (a circuit JSON file, "
                             "e.g. from ctlens discover --out)")
        if not Mode(args.mode).uses_circuit:
            raise UsageError(f"--circuit fixes the circuit of modes gradient, forward, both "
                             f"and random; --mode {args.mode} has none")
    run_json = Path(args.out) / "run.json"
    if args.overwrite or not run_json.is_file():
        return
    try:
        old = json.loads(run_json.read_text())
        old_config = TuneConfig.from_dict(old.get("config", {})).semantic_dict()
    except (OSError, ValueError, TypeError, AttributeError):
        return  # not a readable run: the tuner says what is wrong with it
    from ctlens.tasks.catalog import is_task_file

    task = Path(args.task).stem if is_task_file(args.task) else args.task
    new_config = config_from_args(args).semantic_dict()
    old_config |= {"model": old.get("model"), "task": old.get("task")}
    new_config |= {"model": args.model, "task": task}
    data = old.get("data") or {}
    if not is_task_file(args.task) and {"n_discovery", "n_train"} <= set(data):
        # a built-in task's sizes are its flags (a JSONL task's come from its file)
        old_config |= {"n_examples": data["n_discovery"], "n_train": data["n_train"]}
        new_config |= {"n_examples": args.n, "n_train": args.n_train}
    changed = [key for key in sorted(set(old_config) | set(new_config), key=_flags_first)
               if old_config.get(key) != new_config.get(key)]
    if changed:
        said = "; ".join(f"--{key.replace('_', '-')} {old_config.get(key)!r} there, "
                         f"{new_config.get(key)!r} now" for key in changed[:4])
        steps = ("a run's --steps cannot be changed (its learning-rate and top-N schedules "
                 "depend on them); " if "steps" in changed else "")
        raise UsageError(f"--out {args.out} holds a different run ({said}); {steps}choose "
                         "another --out, or pass --overwrite to replace it")


def _flags_first(key: str) -> tuple[bool, str]:
    """Model and task first in a list of differences: the likeliest mistake."""
    return key not in ("model", "task"), key


class _Given(argparse.Action):
    """Stores the value like argparse's default action and records the option as given
    (``args.given``), so that one given where it does nothing is refused even at its default
    value (`TuneConfig.refuse_inapplicable`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                  values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _add_field(p: argparse.ArgumentParser, field: dataclasses.Field, hint: Any) -> None:
    flag = "--" + field.name.replace("_", "-")
    help_text = _HELP.get(field.name, field.name)
    default = field.default.value if isinstance(field.default, Enum) else field.default
    args = typing.get_args(hint)
    words = _choices(hint)
    given: dict[str, Any] = {"action": _Given} if field.name in APPLIES_ONLY else {}
    if hint is bool:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                       help=help_text)
    elif words is not None:
        p.add_argument(flag, choices=words, default=default, help=help_text, **given)
    elif field.name in ("top_n", "top_n_start"):
        kind = parse_size if field.name == "top_n" else _optional(parse_size)
        p.add_argument(flag, type=kind, default=default, help=help_text, **given)
    elif field.name == "max_memory":
        p.add_argument(flag, type=memory_size, default=default, help=help_text)
    elif field.name == "betas":
        p.add_argument(flag, type=float, nargs=2, default=list(default), metavar=("B1", "B2"),
                       help=help_text, **given)
    elif type(None) in args:
        inner = next(a for a in args if a is not type(None))
        note = "" if "none" in help_text else " (a number or 'none')"
        p.add_argument(flag, type=_optional(inner), default=default, help=help_text + note,
                       **given)
    else:
        p.add_argument(flag, type=hint, default=default, help=help_text, **given)


def _choices(hint: Any) -> list[str] | None:
    """The words of an option typed as a string enum or a literal, optionally ``| None``
    (the CLI takes the plain words; `TuneConfig` converts and checks them)."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] \
        if type(None) in typing.get_args(hint) else [hint]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [m.value for m in kind]
    if typing.get_origin(kind) is typing.Literal:
        return list(typing.get_args(kind))
    return None


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """The `TuneConfig` described by parsed ``ctlens tune`` arguments; an option given where
    it does nothing (``--momentum`` with AdamW) is refused."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TuneConfig)}
    values["betas"] = tuple(values["betas"])
    config = TuneConfig(**values)
    config.refuse_inapplicable(getattr(args, "given", ()))  # given, though at its default
    return config


def run_tune(args: argparse.Namespace) -> int:
    """Run ``ctlens tune``; prints its phases (stderr), the last evaluation and where the
    results are. ``--out`` is locked first (`ctlens.dir_lock`), before anything loads, so a
    second ``ctlens tune`` on it stops at once; under ``--shard`` rank 0 locks it in
    `CircuitTuner.run`."""
    config = config_from_args(args)
    with contextlib.ExitStack() as held:
        if config.shard is None:
            held.enter_context(DirLock(args.out, RUN_LOCK_HOLDER))
        return _tune(args, config)


def _tune(args: argparse.Namespace, config: TuneConfig) -> int:
    """Load torch, the model and the task, then run (or resume) the tuning in ``--out``."""
    with phase("loading torch and the tuner"):
        import torch

        from ctlens.graph import Graph
        from ctlens.model import load_model
        from ctlens.tasks.bundle import load
        from ctlens.tuning.parallel import strategy_type
        from ctlens.tuning.rundir import RunWriteError
        from ctlens.tuning.runner import CircuitTuner

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    processes = strategy_type(config)
    device, error = processes.join_processes(args.device)
    if error:
        print(f"ctlens tune: error: {error}", file=sys.stderr)
        return 2
    with phase(f"loading {args.model}"):
        model = load_model(args.model, device=device)
    fixed = None
    if args.circuit is not None:
        from ctlens.circuit import Circuit

        with phase(f"reading the circuit {args.circuit}"):
            fixed = Circuit.load(args.circuit, model=model)
    d_mlp = int(getattr(model.cfg, "d_mlp", 0) or 0)
    graph = Graph.from_model(model, mlp_groups=config.groups_for(d_mlp))
    if not config.spans:  # with spans N counts (edge, span) pairs: the task's spans decide
        config.top_n_ends(graph.n_edges)  # the sizes meet the graph before any task work
    with phase(f"building task {args.task!r} ({args.n} examples, {args.n_train} training rows)"):
        task = load(args.task, n=args.n, seed=args.data_seed, n_train=args.n_train,
                    n_general=config.general_examples or GENERAL_ROWS,
                    tokenizer=getattr(model, "tokenizer", None))
    inside = "" if fixed is None else f" inside the {fixed.n_edges}-edge circuit of {args.circuit}"
    print(f"circuit-tuning ({config.mode}){inside} for {config.steps} steps into {args.out}, "
          f"evaluating every {config.eval_every}", file=sys.stderr)
    try:
        result = CircuitTuner(model, task, config, model_name=args.model, circuit=fixed,
                              graph=graph).run(
            args.out, overwrite=args.overwrite
        )
    except RunWriteError as err:
        print(f"ctlens tune: error: {err.strerror}", file=sys.stderr)
        return 2
    if not processes.leave_processes():
        return 0  # rank 0 reports
    summary = {k: result.metrics.get(k) for k in
               ("step", "target_metric", "general_loss", "circuit_edges", "params_moved")}
    print(json.dumps(summary))
    print(f"results in {result.out_dir} (metrics.jsonl, circuits/"
          f"{', model/' if result.model_dir else ''}); plot with: ctlens report {result.out_dir}",
          file=sys.stderr)
    return 0

