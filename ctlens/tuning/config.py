"""`TuneConfig` (every knob of a circuit-tuning run) and the step-indexed schedules.

Schedules are pure functions of the step, so a resumed run recomputes them exactly and the
checkpoint only needs the step (plus the learning-rate scheduler's own state, saved anyway).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any, Literal

from ctlens.sizes import CircuitSize
from ctlens.types import (
    Ablation,
    Loss,
    Mode,
    Optimizer,
    Selection,
    Shard,
    check_positive_int,
    parse_choice,
)

Schedule = Literal["constant", "linear", "cosine"]
Discovery = Literal["batch", "task"]

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
DISCOVERIES: tuple[str, ...] = ("batch", "task")
BATCH_METRICS: tuple[str, ...] = ("task", "loss")
RANDOM_MATCHES: tuple[str, ...] = ("edges", "parameters", "composition")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
CHECKPOINT_FORMATS: tuple[str, ...] = ("safetensors", "dcp")
SHARDED_MODES: tuple[str, ...] = ("gradient", "forward", "both", "random", "full")
"""Modes ``shard="fsdp"`` runs (each checked against the unsharded run)."""
_UNSHARDED_WHY = {
    "lora": "it trains a separate peft copy of the model, which ctlens does not shard",
}

# Fields that do not change what a run computes: a resumed run may differ in these.
# (``shard`` changes only the float summation order: within 1e-4 of an unsharded run.)
OPERATIONAL_FIELDS: frozenset[str] = frozenset(
    {"progress", "keep_checkpoints", "shard", "checkpoint_format"}
)

APPLIES_ONLY: dict[str, tuple[str, tuple[str, ...]]] = {
    "momentum": ("optimizer", ("sgd",)),
    "betas": ("optimizer", ("adamw",)),
    "batch_metric": ("discovery", ("batch",)),
    "random_match": ("mode", ("random",)),
    "lora_rank": ("mode", ("lora",)),
    "lora_alpha": ("mode", ("lora",)),
}
"""Options that do something only where another field has one of the values named:
``option: (field, values)``. Elsewhere `TuneConfig` refuses a value other than the option's
default, and ``ctlens tune`` refuses the flag given at all (`TuneConfig.refuse_inapplicable`)."""


@dataclass(frozen=True)
class TuneConfig:
    """Configuration of one `CircuitTuner` run (stored in ``run.json`` as ``config``).

    Circuit:
        mode: ``"gradient"`` (only circuit nodes' parameters move; the paper's),
            ``"forward"`` (edges outside the circuit are mean-ablated in the forward pass),
            ``"both"``, or a baseline: ``"full"`` (full fine-tuning), ``"random"`` (a random
            circuit matched as ``random_match`` says, redrawn every ``every_k`` steps,
            enforced like ``"gradient"``), ``"lora"`` (LoRA adapters via peft; needs
            ``pip install peft``).
        random_match: what ``mode="random"``'s circuit shares with the one discovery would
            select at that step (`ctlens.tuning.controls`): ``"edges"`` (its edge count),
            ``"parameters"`` (its trainable-parameter count; the default) or
            ``"composition"`` (its trainable parameters per node kind). A ``run.json``
            written before this option reads as ``"edges"``.
        top_n: edges kept (the final value when a schedule is used).
        top_n_start: first value of the N schedule (default: ``top_n``).
        top_n_schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` from ``top_n_start`` to
            ``top_n`` over ``steps``.
        every_k: re-discover the circuit every K optimizer steps (the paper: 1).
        discovery: ``"batch"`` (EAP on the current training batch, its own per-position mean
            as the ablation, reusing the training forward; the paper's) or ``"task"`` (EAP
            on ``discovery_batches`` batches of the task's discovery pairs, averaged).
        batch_metric: what ``"batch"`` discovery differentiates: ``"task"`` (the task metric
            on the training batch; one extra backward) or ``"loss"`` (minus the training
            loss, whose backward is shared with the optimizer step: cheapest).
        discovery_ablation: ablation for ``"task"`` discovery: a `ctlens.types.Ablation`
            value, ``"corrupt"``, ``"mean"`` or ``"zero"``.
        discovery_batches: batches of ``batch_size`` discovery pairs per ``"task"`` discovery.
        max_memory: the memory budget of ``"task"`` discovery's attribution (and of the
            monitor circuit's), bytes or a size such as ``"8GB"``: `ctlens.attribute`'s
            ``max_memory`` (None: half of what is free on the device).
        ema: exponential moving average of scores across rediscoveries
            (``s = ema * s_old + (1 - ema) * s_new``; 0 disables it).
        selection: how the N edges are chosen: ``"top_n"`` (largest |score|) or
            ``"top_nodes"`` (the paper's official code: largest |score| x the sender's summed
            |scores| x the receiver's summed |scores|).
        spans: positional circuits (``ctlens tune --spans``): edges are scored, selected and
            (in the forward modes) masked per token span of the task (`ctlens.spans`), so a
            circuit keeps (edge, span) pairs and ``top_n`` counts pairs. Needs spans on the
            task's discovery data and training rows (``train_data``), with the same names.
            Each training batch's forward mask reads that batch's span labels; the gradient
            restriction opens a node when it is in the circuit at any span (parameters are
            shared across positions). ``random`` draws (edge, span) pairs (``random_match=
            "edges"``) or matches parameters on the node set, kept at every span; ``full``
            and ``lora`` train without a circuit and snapshot positional monitor circuits.
            Not with ``shard="fsdp"`` (untested there).
        train_embeddings / train_unembedding: let the ``input`` / ``logits`` nodes' weights
            move in gradient mode when they are in the circuit.
    Optimisation:
        optimizer: ``"adamw"`` (``betas``, ``weight_decay``) or ``"sgd"`` (``momentum``,
            ``weight_decay``; the paper's official code uses SGD, momentum 0.9, weight decay
            1e-4). Gradient restriction is exact under both.
        loss: ``"target"`` (the NLL of the task's target tokens) or ``"sequence"`` (the NLL
            of every real token of the training row, the paper's official loss).
        steps, batch_size, lr, weight_decay, betas, momentum, grad_clip (``None``: off),
        lr_schedule (``"constant"``, ``"linear"`` or ``"cosine"`` decay after
        ``warmup_steps`` of linear warm-up), metric_beta (adds ``beta * |metric|`` on the
        training batch: the paper's de-biasing term).
    LoRA: lora_rank, lora_alpha.
    Scale:
        shard: ``None`` (every rank holds the whole model) or ``"fsdp"`` (parameters,
            gradients and optimizer state sharded with PyTorch FSDP2 across the ranks of the
            initialised process group; `ctlens.tuning.parallel.fsdp`). Every mode but
            ``"lora"``, with either discovery (`SHARDED_MODES`).
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"``: the training forward under
            `torch.autocast` with fp32 master weights, loss, backward and scores (``"fp16"``
            with a loss scaler); evaluation stays fp32 (`ctlens.tuning.precision`). Part of
            what a run computes: a run resumes only at its own precision.
        checkpoint_format: ``"safetensors"`` (consolidated: whole weights in one file, the
            optimizer state whole; the default, readable by any process) or ``"dcp"``
            (``torch.distributed.checkpoint``: each rank writes its own shard, nothing is
            gathered; `ctlens.tuning.sharded_checkpoints`). Either resumes on any number of
            ranks, sharded or not; ``shard`` and ``checkpoint_format`` may change on resume.
    Bookkeeping:
        eval_every, eval_examples (per evaluation set; ``None``: all), general_examples
        (the first rows of the task's general corpus that the general LM loss is measured
        on, a setting of its own; ``None``: all; a ``run.json`` written before it existed
        reads as its ``eval_examples``, which cut those rows then), save_every,
        keep_checkpoints, seed (the batch order and the random draws; the task sample is
        the task's own), export (write ``model/`` at the end), progress (tqdm).
    """

    mode: Mode = Mode.GRADIENT
    random_match: Literal["edges", "parameters", "composition"] = "parameters"
    top_n: int | float | CircuitSize = 300
    top_n_start: int | float | CircuitSize | None = None
    top_n_schedule: Schedule = "constant"
    every_k: int = 1
    discovery: Discovery = "batch"
    batch_metric: Literal["task", "loss"] = "task"
    discovery_ablation: Ablation = Ablation.MEAN
    discovery_batches: int = 4
    max_memory: int | str | None = None
    ema: float = 0.0
    selection: Selection = Selection.TOP_N
    spans: bool = False
    train_embeddings: bool = False
    train_unembedding: bool = False
    optimizer: Optimizer = Optimizer.ADAMW
    loss: Loss = Loss.TARGET
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    grad_clip: float | None = 1.0
    lr_schedule: Schedule = "constant"
    warmup_steps: int = 0
    metric_beta: float = 0.0
    mlp_groups: int = 1
    mlp_group_size: int | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    shard: Shard | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpoint_format: Literal["safetensors", "dcp"] = "safetensors"
    eval_every: int = 50
    eval_examples: int | None = 128
    general_examples: int | None = 128
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    export: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _set(self, "mode", parse_choice(Mode, self.mode, "mode"))
        _choice("top_n_schedule", self.top_n_schedule, SCHEDULES)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _choice("discovery", self.discovery, DISCOVERIES)
        _choice("batch_metric", self.batch_metric, BATCH_METRICS)
        _set(self, "discovery_ablation",
             parse_choice(Ablation, self.discovery_ablation, "discovery_ablation"))
        _set(self, "selection", parse_choice(Selection, self.selection, "selection"))
        _choice("random_match", self.random_match, RANDOM_MATCHES)
        if self.mode == "random" and self.random_match != "edges" and (
            self.train_embeddings or self.train_unembedding
        ):
            raise ValueError(
                f"random_match={self.random_match!r} draws nodes other than input and logits; "
                "use it without train_embeddings / train_unembedding, or random_match='edges'"
            )
        _set(self, "optimizer", parse_choice(Optimizer, self.optimizer, "optimizer"))
        _set(self, "loss", parse_choice(Loss, self.loss, "loss"))
        if not (_finite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        for name in ("steps", "every_k", "batch_size", "eval_every", "save_every",
                     "discovery_batches", "lora_rank", "keep_checkpoints", "mlp_groups"):
            check_positive_int(name, getattr(self, name))
        end = CircuitSize.of(self.top_n, "top_n")
        start = end if self.top_n_start is None else CircuitSize.of(self.top_n_start,
                                                                    "top_n_start")
        _set(self, "top_n", end.value)
        if self.top_n_start is not None:
            _set(self, "top_n_start", start.value)
        _set(self, "_sizes", (start, end))  # the checked schedule ends (not a field)
        if self.mlp_group_size is not None:
            check_positive_int("mlp_group_size", self.mlp_group_size)
            if self.mlp_groups != 1:
                raise ValueError(
                    f"give mlp_groups ({self.mlp_groups}) or mlp_group_size "
                    f"({self.mlp_group_size}), not both"
                )
        for name in ("eval_examples", "general_examples"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.max_memory is not None:
            from ctlens.memory import parse_bytes

            parse_bytes(self.max_memory)  # a clear error now, not at the first discovery
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not _finite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (_finite(self.ema) and 0 <= self.ema < 1):
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        if self.grad_clip is not None and (not _finite(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if not _finite(self.metric_beta) or self.metric_beta < 0:
            raise ValueError(f"metric_beta must be >= 0, got {self.metric_beta!r}")
        if len(self.betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not _finite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if self.shard is not None:
            _set(self, "shard", parse_choice(Shard, self.shard, "shard"))
            if self.mode not in SHARDED_MODES:
                raise ValueError(
                    f"shard='fsdp' supports mode {' / '.join(SHARDED_MODES)} only, not "
                    f"mode={self.mode.value!r}: {_UNSHARDED_WHY.get(self.mode, 'untested')}. "
                    "Run it "
                    "unsharded (shard=None; with torchrun it is then data-parallel, each rank "
                    "holding the whole model), or use mode='gradient'"
                )
        if self.spans is not False and self.spans is not True:
            raise ValueError(f"spans must be True or False, got {self.spans!r}")
        if self.spans and self.shard is not None:
            raise ValueError(
                "spans=True (--spans) is not supported with shard='fsdp': positional tuning "
                "is untested on sharded parameters; run it unsharded (drop --shard), or "
                "tune position-free"
            )
        _choice("precision", self.precision, PRECISIONS)
        _choice("checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        defaults = {f.name: f.default for f in fields(self)}
        self.refuse_inapplicable(name for name in APPLIES_ONLY
                                 if getattr(self, name) != defaults[name])

    def refuse_inapplicable(self, names: Iterable[str]) -> None:
        """Refuse, in one line naming the option and what it needs, any of ``names`` that
        does nothing with this configuration (`APPLIES_ONLY`: ``momentum`` with AdamW,
        ``betas`` with SGD, ...), instead of ignoring it silently."""
        for name in names:
            if name not in APPLIES_ONLY:
                continue
            field, values = APPLIES_ONLY[name]
            current = str(getattr(self, field))
            if current in values:
                continue
            value = getattr(self, name)
            spelled = (f"({','.join(map(str, value))})" if isinstance(value, tuple)
                       else repr(value))
            typed = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
            needs = " or ".join(f"{field}={v!r} ({_flag(field)} {v})" for v in values)
            raise ValueError(
                f"{name}={spelled} ({_flag(name)} {typed}) applies only with {needs}; with "
                f"{field}={current!r} ({_flag(field)} {current}) it does nothing: leave it out, "
                f"or choose {needs}"
            )

    @property
    def uses_circuit(self) -> bool:
        """Whether the run selects and enforces a circuit (not ``full`` or ``lora``)."""
        return self.mode.uses_circuit

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (``run.json``'s ``config``): plain values, the
        enums as their strings."""
        data = {k: v.value if isinstance(v, Enum) else v for k, v in asdict(self).items()}
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneConfig:
        """Inverse of `to_dict`; unknown keys are ignored (forward compatibility), a missing
        ``random_match`` reads as ``"edges"`` and a missing ``general_examples`` as the
        ``eval_examples`` (what runs did before each existed), and an option that did
        nothing in the run (`APPLIES_ONLY`; written before such values were refused) reads
        as its default."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("random_match", "edges")  # written before random_match existed
        if "eval_examples" in values:  # written before general_examples existed
            values.setdefault("general_examples", values["eval_examples"])
        defaults = {f.name: f.default for f in fields(cls)}
        for name, (field, allowed) in APPLIES_ONLY.items():
            if str(values.get(field, defaults[field])) not in allowed:
                values.pop(name, None)  # did nothing in that run (`APPLIES_ONLY`)
        return cls(**values)

    def semantic_dict(self) -> dict[str, Any]:
        """`to_dict` without the fields that do not change results (for resume checks)."""
        data = {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_FIELDS}
        if self.mode != "random":
            del data["random_match"]  # means nothing outside random runs
        if self.precision == "fp32":
            del data["precision"]  # likewise for precision
        return data

    def top_n_ends(self, n_edges: int | None) -> tuple[int, int]:
        """The schedule's first and last N on a graph with ``n_edges`` valid edges: where a
        size meets the graph (`ctlens.sizes.CircuitSize.edges`), so a count larger than the
        graph is refused here. `CircuitTuner`, ``ctlens tune`` and the Trainer callback ask
        before any attribution. A fraction (``top_n=0.01``) needs ``n_edges``."""
        start, end = self._sizes
        for size in (end, start):  # top_n first, as it is named first
            if isinstance(size.value, float) and n_edges is None:
                raise ValueError(f"{size.name}={size.value} is a fraction: pass the graph's "
                                 "n_edges")
        if n_edges is None:
            return int(start.value), int(end.value)
        last = end.edges(n_edges)
        return start.edges(n_edges), last

    def top_n_at(self, step: int, n_edges: int | None = None) -> int:
        """N of the top-N schedule at optimizer step ``step`` (0-based); ``n_edges`` as in
        `top_n_ends`."""
        start, end = self.top_n_ends(n_edges)
        frac = _progress(self.top_n_schedule, step, self.steps)
        return int(round(start + (end - start) * frac))

    def groups_for(self, d_mlp: int) -> int:
        """Neuron groups per MLP: ``mlp_groups``, or ``d_mlp / mlp_group_size``."""
        if self.mlp_group_size is None:
            return self.mlp_groups
        if d_mlp % self.mlp_group_size:
            raise ValueError(
                f"mlp_group_size={self.mlp_group_size} does not divide the MLP width {d_mlp}; "
                "choose a divisor of it, or give mlp_groups"
            )
        return d_mlp // self.mlp_group_size

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at step ``step``: linear warm-up, then the decay schedule."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        span = max(1, self.steps - self.warmup_steps)
        return 1.0 - _progress(self.lr_schedule, step - self.warmup_steps, span)


def _progress(schedule: str, step: int, total: int) -> float:
    """0 -> 1 over ``total`` steps along ``schedule`` (constant: always 1)."""
    if schedule == "constant":
        return 1.0
    t = min(max(step, 0), total) / max(1, total - 1) if total > 1 else 1.0
    t = min(t, 1.0)
    if schedule == "linear":
        return t
    return (1.0 - math.cos(math.pi * t)) / 2.0


def _flag(name: str) -> str:
    """``ctlens tune``'s flag for field ``name``."""
    return "--" + name.replace("_", "-")


def _set(config: TuneConfig, name: str, value: Any) -> None:
    """Store a validated, converted field on the frozen config."""
    object.__setattr__(config, name, value)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
