"""`TuneConfig` (every knob of a circuit-tuning run) and the step-indexed schedules.

Schedules are pure functions of the step, so a resumed run recomputes them exactly and the
checkpoint only needs the step (plus the learning-rate scheduler's own state, saved anyway).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ctlens.types import Ablation

Mode = Literal["gradient", "forward", "both", "full", "random", "lora"]
Schedule = Literal["constant", "linear", "cosine"]
Discovery = Literal["batch", "task"]

MODES: tuple[str, ...] = ("gradient", "forward", "both", "full", "random", "lora")
CIRCUIT_MODES: tuple[str, ...] = ("gradient", "forward", "both", "random")
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
DISCOVERIES: tuple[str, ...] = ("batch", "task")
BATCH_METRICS: tuple[str, ...] = ("task", "loss")
ABLATIONS: tuple[str, ...] = tuple(a.value for a in Ablation)
"""``discovery_ablation``'s choices: the `ctlens.types.Ablation` enum's values."""

# Fields that do not change what a run computes: a resumed run may differ in these.
OPERATIONAL_FIELDS: frozenset[str] = frozenset({"progress", "keep_checkpoints"})


@dataclass(frozen=True)
class TuneConfig:
    """Configuration of one `CircuitTuner` run (stored in ``run.json`` as ``config``).

    Circuit:
        mode: ``"gradient"`` (only circuit nodes' parameters move; the paper's),
            ``"forward"`` (edges outside the circuit are mean-ablated in the forward pass),
            ``"both"``, or a baseline: ``"full"`` (full fine-tuning), ``"random"`` (a random
            edge set of the same size, redrawn every ``every_k`` steps, enforced like
            ``"gradient"``), ``"lora"`` (LoRA adapters via peft; needs ``pip install peft``).
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
        ema: exponential moving average of scores across rediscoveries
            (``s = ema * s_old + (1 - ema) * s_new``; 0 disables it).
        train_embeddings / train_unembedding: let the ``input`` / ``logits`` nodes' weights
            move in gradient mode when they are in the circuit.
    Optimisation:
        steps, batch_size, lr, weight_decay, betas, grad_clip (``None``: off),
        lr_schedule (``"constant"``, ``"linear"`` or ``"cosine"`` decay after
        ``warmup_steps`` of linear warm-up), metric_beta (adds ``beta * |metric|`` on the
        training batch: the paper's de-biasing term).
    LoRA: lora_rank, lora_alpha.
    Bookkeeping:
        eval_every, eval_examples (per evaluation set; ``None``: all), save_every,
        keep_checkpoints, seed, export (write ``model/`` at the end), progress (tqdm).
    """

    mode: Mode = "gradient"
    top_n: int = 300
    top_n_start: int | None = None
    top_n_schedule: Schedule = "constant"
    every_k: int = 1
    discovery: Discovery = "batch"
    batch_metric: Literal["task", "loss"] = "task"
    discovery_ablation: str = field(default="mean", metadata={"choices": ABLATIONS})
    discovery_batches: int = 4
    ema: float = 0.0
    train_embeddings: bool = False
    train_unembedding: bool = False
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    lr_schedule: Schedule = "constant"
    warmup_steps: int = 0
    metric_beta: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    eval_every: int = 50
    eval_examples: int | None = 128
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    export: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _choice("mode", self.mode, MODES)
        _choice("top_n_schedule", self.top_n_schedule, SCHEDULES)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _choice("discovery", self.discovery, DISCOVERIES)
        _choice("batch_metric", self.batch_metric, BATCH_METRICS)
        _choice("discovery_ablation", self.discovery_ablation, ABLATIONS)
        object.__setattr__(self, "discovery_ablation", Ablation(self.discovery_ablation).value)
        for name in ("steps", "every_k", "top_n", "batch_size", "eval_every", "save_every",
                     "discovery_batches", "lora_rank", "keep_checkpoints"):
            _positive_int(name, getattr(self, name))
        if self.top_n_start is not None:
            _positive_int("top_n_start", self.top_n_start)
        if self.eval_examples is not None:
            _positive_int("eval_examples", self.eval_examples)
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
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def uses_circuit(self) -> bool:
        """Whether the run selects and enforces a circuit (not ``full`` or ``lora``)."""
        return self.mode in CIRCUIT_MODES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (``run.json``'s ``config``)."""
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneConfig:
        """Inverse of `to_dict`; unknown keys are ignored (forward compatibility)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def semantic_dict(self) -> dict[str, Any]:
        """`to_dict` without the fields that do not change results (for resume checks)."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_FIELDS}

    def top_n_at(self, step: int) -> int:
        """N of the top-N schedule at optimizer step ``step`` (0-based)."""
        start = self.top_n if self.top_n_start is None else self.top_n_start
        frac = _progress(self.top_n_schedule, step, self.steps)
        return int(round(start + (self.top_n - start) * frac))

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


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
