"""Learned circuits (`learn_circuit`): a gate per edge, trained for faithfulness at a target size.

Edge Pruning (Bhaskar et al., NeurIPS 2024): every edge of the graph gets a hard-concrete
gate (`ctlens.learning.gates`); with the model frozen, the gates' logits ``log_alpha`` are
trained so the gated model's output stays close to the full model's while the expected
number of open gates is driven to the target by a Lagrangian. On a positional graph
(token spans) each (edge, span) pair gets a gate (`ctlens.learning.span_gates`), counted
like an edge everywhere below, as `Circuit.from_scores` counts ``top_n``. The phases:

1. **Check** the inputs: the data, the target size (``top_n`` as in `Circuit.from_scores`:
   a count, or a fraction of the valid edges), the steps, the objective, the reference
   (`ctlens.reference.resolve_reference`, as in `attribute` and `faithfulness`).
2. **Targets**, once, without gradients (the model is frozen, so they are constants of the
   run): per example, the full model's answer log-probabilities and metric and the empty
   circuit's metric (every gate closed); under corrupt ablation also every sender's
   output on the corrupt prompt, kept for the whole run when it fits in
   `REFERENCE_CACHE_BYTES` (else recorded again at every step). Faithfulness must be
   defined on the data (the full and empty metrics differ), else the error says why.
3. **Train** ``steps`` steps on batches in a seeded order: draw the gates, run the gated
   model to the final residual stream, unembed the answer positions, and minimise the
   objective plus ``lam (f - t)^2``, where ``f`` is the expected fraction of open gates and
   ``t`` the target fraction, lowered linearly from 1 to the final target over the first
   `TARGET_WARMUP` of the steps. Adam descends on ``log_alpha`` (learning rate ``lr`` after
   a linear warm-up over `LR_WARMUP` of the steps); a second Adam ascends on ``mu`` with
   ``lam = exp(mu)`` (learning rate `MULTIPLIER_GROWTH` / ``steps``): the gradient on
   ``mu`` is never negative, so the penalty stiffens about exponentially. Edge
   Pruning's Lagrangian is ``l1 (f - t) + l2 (f - t)^2`` with ``l1, l2`` ascended directly;
   on the zoo its linear term kept closing gates after the target was met (26.0 of 40
   edges expected open at the end on tiny-gpt2 ioi), and the quadratic term alone,
   ascended linearly, stiffened too slowly for small circuits (17.3 of 8 edges expected
   open after 400 steps); the exponential multiplier ends at 40.0 and 8.0 there. The
   objective is Edge Pruning's: ``"kl"``, the KL divergence of the gated model's answer
   distribution from the full model's, averaged over examples and answer positions; or
   ``"metric"``, the squared difference of the task metric from the full model's per
   example, in units of ``M_full - M_empty``.
4. **Select** the ``top_n`` edges with the largest ``log_alpha`` (ties by graph order). The
   circuit's scores are the gates' open probabilities ``P(g > 0)``; its faithfulness is
   measured exactly with `ctlens.faithfulness` on the same data, ablation and reference.
   When the expected number of open gates ends more than `SIZE_TOLERANCE` above the
   target, the gates did not get there in ``steps`` steps: `TargetNotReachedError` says so.

The model is left exactly as it was found: parameters frozen and modes set to eval only
inside (`ctlens.bridge.hooks.frozen_parameters`, `eval_mode`), hooks added only by a
context that removes them, also on error. The seed fixes the batch order, the gates'
initial values and every hard-concrete draw (CPU generators, no global RNG).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from tqdm.auto import tqdm

from ctlens.bridge.hooks import (
    eval_mode,
    frozen_parameters,
    model_device,
    supports_truncated_forward,
)
from ctlens.circuit import Circuit
from ctlens.circuit.selection import top_n_mask
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.learning.gates import GatedForward, open_probability, sample_gates
from ctlens.learning.span_gates import SpanGatedForward, gated_forward
from ctlens.masking.evaluate import _check_separates, faithfulness
from ctlens.reference import Reference, check_graph, resolve_reference
from ctlens.sizes import CircuitSize
from ctlens.types import Ablation

OBJECTIVES = ("kl", "metric")
DEFAULT_STEPS = 400
INIT_LOG_ALPHA = 3.0
"""Initial gate logit (every gate open with probability 0.99), plus N(0, 0.01) noise."""
MULTIPLIER_GROWTH = 20.0
"""How far ``mu`` (the size penalty's multiplier is ``exp(mu)``, from 1) can rise over a
run: its Adam learning rate is ``MULTIPLIER_GROWTH / steps`` (0.05 for 400 steps), so the
stiffening follows the run's length and the multiplier stays below ``exp(20)``."""
TARGET_WARMUP = 0.7
LR_WARMUP = 0.05
SIZE_TOLERANCE = 0.1
"""How far above ``top_n`` (relative, at least one edge) the expected number of open gates
may end and still count as reaching the target."""
REFERENCE_CACHE_BYTES = 1 << 30


class TargetNotReachedError(ValueError):
    """The gates did not reach the target size in the steps given (message: what to change)."""


@dataclass(frozen=True)
class _Targets:
    """What the frozen model gives on every example, computed once (phase 2)."""

    logprobs: Float[torch.Tensor, "n P vocab"]  # full model, answer positions
    metric_full: Float[torch.Tensor, " n"]
    metric_empty: Float[torch.Tensor, " n"]
    reference: torch.Tensor | None  # corrupt: [n_senders, n, seq, d_model] when cached

    @property
    def scale(self) -> float:
        """``M_full - M_empty`` over the whole data (the metric objective's unit)."""
        return float(self.metric_full.mean() - self.metric_empty.mean())


def learn_circuit(
    model: Any,
    data: TaskData,
    top_n: int | float,
    ablation: str | Ablation = "corrupt",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    *,
    objective: str = "kl",
    reference: Reference = None,
    batch_size: int = 32,
    lr: float = 0.1,
    graph: Graph | None = None,
    progress: bool = True,
) -> Circuit:
    """Learn a circuit of ``top_n`` edges by training one gate per edge. See the module docstring.

    Args:
        model: a bridge from `ctlens.load_model`; left unchanged.
        data: the task examples; the objective reads their answer positions.
        top_n: edges in the circuit: a count (1 .. valid edges) or a fraction of the valid
            edges in (0, 1), as in `Circuit.from_scores`.
        ablation: what a closed gate replaces a sender with: ``"corrupt"``, ``"mean"`` or
            ``"zero"`` (as in `ctlens.faithfulness`).
        steps: optimisation steps (one batch each).
        seed: fixes the batch order, the initial gates and every gate draw.
        objective: ``"kl"`` (Edge Pruning's: KL from the full model's answer distribution)
            or ``"metric"`` (match the task metric per example).
        reference: overrides the default ablation reference, as in `ctlens.faithfulness`.
        batch_size: examples per step (and per pass of the targets and faithfulness).
        lr: peak Adam learning rate of the gate logits.
        graph: the graph to learn on, e.g. ``Graph.from_model(model, mlp_groups=8)``
            (default: one node per MLP); a positional one, ``Graph.from_model(model,
            spans=data)``, learns a gate per (edge, span) pair: ``data`` must carry the
            graph's spans, and ``top_n`` counts pairs.
        progress: show a progress bar with the expected circuit size, the target and the
            faithfulness of the sampled gates.

    Returns:
        A `Circuit` of ``graph`` (positional when it is) of exactly ``top_n`` edges (or
        (edge, span) pairs) whose scores are the learned open
        probabilities; ``metadata["learning"]`` records the settings, the exact
        ``faithfulness`` of the circuit on ``data``, the final expected size, the time
        taken and a ``history`` of (step, target, expected size, objective, faithfulness).

    Raises:
        TargetNotReachedError: the expected number of open gates ended more than
            `SIZE_TOLERANCE` (relative) above ``top_n``; use more steps or a larger lr.
        ValueError: a bad argument, data without a positional graph's spans, or
            faithfulness undefined on ``data``.
    """
    start = time.perf_counter()
    ablation = Ablation.parse(ablation)
    _check_arguments(data, steps, objective, batch_size, lr)
    graph = check_graph(model, graph)
    if graph.positional:  # a gate per (edge, span): every example needs the graph's spans
        graph.check_spans(data.span_names, "the task data")
    n_keep = CircuitSize.of(top_n, "top_n").edges(graph.n_edges)
    data.check_vocab(model.cfg.d_vocab)
    data.check_context(getattr(model.cfg, "n_ctx", None))
    if not supports_truncated_forward(model):
        raise ValueError("learn_circuit needs a ctlens.load_model bridge (ln_final and unembed)")
    settings = {"top_n": n_keep, "steps": steps, "seed": seed, "objective": objective,
                "ablation": ablation.value, "batch_size": batch_size, "lr": lr}
    with frozen_parameters(model), eval_mode(model):
        corrupt, means = resolve_reference(model, graph, data, ablation, reference, batch_size)
        gated = gated_forward(model, graph, ablation, means)
        with model.hooks(fwd_hooks=gated.hooks()):
            targets = _targets(gated, data, corrupt, batch_size)
            _check_separates(
                float(targets.metric_full.mean()), float(targets.metric_empty.mean()),
                ablation, len(data),
            )
            trainer = _Trainer(gated, data, corrupt, targets, settings)
            history = trainer.run(progress)
    log_alpha = trainer.log_alpha.detach().cpu()
    valid = graph.dense_valid
    expected = float(open_probability(log_alpha)[valid].sum())
    _check_reached(expected, n_keep, steps, lr)
    mask = top_n_mask(log_alpha - log_alpha[valid].min(), graph, n_keep)
    circuit = Circuit(
        graph, mask, open_probability(log_alpha) * valid,
        {"method": "learned", "selection": {"method": "learned", "top_n": n_keep}},
        getattr(model.cfg, "model_name", None),
    )
    result = faithfulness(model, data, circuit, ablation, reference, batch_size)
    circuit.metadata["learning"] = {
        **settings, "faithfulness": result.faithfulness, "expected_edges": expected,
        "n_examples": len(data), "seconds": time.perf_counter() - start, "history": history,
    }
    return circuit


def _check_arguments(data: Any, steps: Any, objective: Any, batch_size: Any, lr: Any) -> None:
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a ctlens.TaskData, got {type(data).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")


def _check_reached(expected: float, n_keep: int, steps: int, lr: float) -> None:
    """Raise `TargetNotReachedError` when the expected size ended too far above ``n_keep``."""
    if expected - n_keep <= max(1.0, SIZE_TOLERANCE * n_keep):
        return
    raise TargetNotReachedError(
        f"the learned gates did not reach the target of {n_keep} edges in {steps} steps "
        f"(lr={lr}): {expected:.1f} gates are expected open at the end, more than "
        f"{SIZE_TOLERANCE:.0%} above it, so the {n_keep} highest gates are not a circuit the "
        f"training converged to. Use more steps (e.g. steps={2 * steps}) or a larger "
        "learning rate"
    )


def _answer_logits(
    gated: GatedForward, residual: torch.Tensor, positions: torch.Tensor
) -> Float[torch.Tensor, "batch P vocab"]:
    """Logits at the answer positions ``[batch, P]`` from the final residual stream."""
    rows = torch.arange(residual.shape[0], device=residual.device)[:, None]
    return gated.logits(residual[rows, positions.to(residual.device)]).float()


def _metric(
    batch: TaskData, gated: GatedForward, residual: torch.Tensor, answers: torch.Tensor,
    full_logprobs: torch.Tensor,
) -> Float[torch.Tensor, " batch"]:
    """The task metric per example: at the answer logits for a built-in metric (re-indexed
    to ``[batch, P]`` positions), on the full logits for a callable one."""
    if callable(batch.metric):
        return batch.metric_values(gated.logits(residual))
    n, n_pos = answers.shape[:2]
    at = torch.arange(n_pos, device=answers.device).expand(n, n_pos)
    assert batch.positions is not None
    indexed = TaskData(
        clean=torch.zeros(n, n_pos, dtype=torch.long, device=answers.device),
        correct=batch.correct, wrong=batch.wrong, metric=batch.metric,
        positions=at if batch.positions.ndim == 2 else at[:, 0],
    )
    return indexed.metric_values(answers, full_logprobs)


def _use_spans(gated: GatedForward, batch: TaskData) -> None:
    """Hand a span-gated forward the span labels of ``batch`` (its next forwards' tokens)."""
    if isinstance(gated, SpanGatedForward):
        assert batch.spans is not None  # checked against the graph's spans on entry
        gated.set_spans(batch.spans)


@torch.no_grad()
def _targets(
    gated: GatedForward, data: TaskData, corrupt: torch.Tensor | None, batch_size: int
) -> _Targets:
    """Phase 2: the full model's answer log-probs and metric, the empty circuit's metric
    and (when it fits) the corrupt reference of every example."""
    model, graph = gated.model, gated.graph
    device = model_device(model)
    n, seq = data.clean.shape
    param = next(model.parameters())
    cached = corrupt is not None and (
        graph.n_senders * n * seq * model.cfg.d_model * param.element_size()
        <= REFERENCE_CACHE_BYTES
    )
    reference = None
    if cached:
        reference = torch.zeros(
            graph.n_senders, n, seq, model.cfg.d_model, device=device, dtype=param.dtype
        )
    logprobs, full, empty = [], [], []
    closed = torch.zeros(graph.dense_shape, device=device)
    for offset in range(0, n, batch_size):
        rows = slice(offset, min(n, offset + batch_size))
        batch = data[rows].trimmed().to(device)
        p = batch.clean.shape[1]
        with gated.paused():
            residual = gated.residual(batch.clean)
        answers = _answer_logits(gated, residual, batch.positions_2d)
        logprobs.append(answers.log_softmax(-1))
        full.append(_metric(batch, gated, residual, answers, answers))
        if corrupt is not None:
            ref = gated.record_reference(corrupt[rows, :p])
            gated.use_reference(ref)
            if reference is not None:
                reference[:, rows, :p] = ref
        _use_spans(gated, batch)
        gated.set_gates(closed)
        residual = gated.residual(batch.clean)
        gated.set_gates(None)
        empty.append(
            _metric(batch, gated, residual, _answer_logits(gated, residual, batch.positions_2d),
                    answers)
        )
    return _Targets(torch.cat(logprobs), torch.cat(full), torch.cat(empty), reference)


class _Trainer:
    """Phase 3: the gate logits, the penalty's multiplier, their optimisers and the loop."""

    def __init__(
        self,
        gated: GatedForward,
        data: TaskData,
        corrupt: torch.Tensor | None,
        targets: _Targets,
        settings: dict[str, Any],
    ) -> None:
        self.gated, self.data, self.corrupt, self.targets = gated, data, corrupt, targets
        self.settings = settings
        graph = gated.graph
        self.device = model_device(gated.model)
        self.valid = graph.dense_valid.to(self.device)
        self.n_edges = graph.n_edges
        self.generator = torch.Generator().manual_seed(int(settings["seed"]))
        init = INIT_LOG_ALPHA + 0.01 * torch.randn(graph.dense_shape, generator=self.generator)
        self.log_alpha = init.to(self.device).requires_grad_(True)
        self.log_multiplier = torch.zeros((), device=self.device, requires_grad=True)
        steps = int(settings["steps"])
        self.optimizer = torch.optim.Adam([self.log_alpha], lr=float(settings["lr"]))
        warm = max(1, round(LR_WARMUP * steps))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda k: min(1.0, (k + 1) / warm),
        )
        self.ascent = torch.optim.Adam(
            [self.log_multiplier], lr=MULTIPLIER_GROWTH / steps, maximize=True
        )
        self.order: list[int] = []

    def target_fraction(self, step: int) -> float:
        """The kept fraction the penalty aims at after ``step`` steps (1 down to final)."""
        final = int(self.settings["top_n"]) / self.n_edges
        ramp = max(1, round(TARGET_WARMUP * int(self.settings["steps"])))
        return 1.0 - (1.0 - final) * min(1.0, step / ramp)

    def next_batch(self) -> torch.Tensor:
        """The next ``batch_size`` example indices (a seeded permutation per epoch)."""
        size = int(self.settings["batch_size"])
        while len(self.order) < size:
            self.order += torch.randperm(len(self.data), generator=self.generator).tolist()
            if len(self.data) < size:
                size = len(self.data)
        index, self.order = self.order[:size], self.order[size:]
        return torch.tensor(index)

    def reference(self, index: torch.Tensor, p: int) -> torch.Tensor | None:
        """The corrupt reference of examples ``index`` (cached or recorded now)."""
        if self.corrupt is None:
            return None
        if self.targets.reference is not None:
            return self.targets.reference[:, index.to(self.device), :p]
        return self.gated.record_reference(self.corrupt[index, :p])

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns its objective, size and metric sums."""
        index = self.next_batch()
        batch = self.data[index].trimmed().to(self.device)
        ref = self.reference(index, batch.clean.shape[1])
        if ref is not None:
            self.gated.use_reference(ref)
        _use_spans(self.gated, batch)
        self.gated.set_gates(sample_gates(self.log_alpha, self.generator))
        residual = self.gated.residual(batch.clean)
        answers = _answer_logits(self.gated, residual, batch.positions_2d)
        full = self.targets.logprobs[index.to(self.device)]
        metric = _metric(batch, self.gated, residual, answers, full)
        if self.settings["objective"] == "kl":
            loss = F.kl_div(
                answers.log_softmax(-1), full, log_target=True, reduction="none"
            ).sum(-1).mean()
        else:
            wanted = self.targets.metric_full[index.to(self.device)]
            loss = ((metric - wanted) / self.targets.scale).pow(2).mean()
        kept = open_probability(self.log_alpha)[self.valid].sum() / self.n_edges
        gap = kept - self.target_fraction(step)
        penalty = self.log_multiplier.exp() * gap.pow(2)
        self.optimizer.zero_grad(set_to_none=True)
        self.ascent.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        self.optimizer.step()
        self.ascent.step()
        self.schedule.step()
        self.gated.set_gates(None)
        i = index.to(self.device)
        return {
            "objective": float(loss.detach()),
            "expected_edges": float(kept.detach()) * self.n_edges,
            "sum_gated": float(metric.detach().sum()),
            "sum_full": float(self.targets.metric_full[i].sum()),
            "sum_empty": float(self.targets.metric_empty[i].sum()),
            "n": float(len(index)),
        }

    def run(self, progress: bool) -> list[dict[str, float]]:
        """Every step, with a progress bar; returns the history (about 20 records)."""
        steps = int(self.settings["steps"])
        every = max(1, steps // 20)
        history: list[dict[str, float]] = []
        window: dict[str, float] = {}
        bar = tqdm(range(1, steps + 1), desc="learn_circuit", disable=not progress, unit="step")
        for step in bar:
            record = self.step(step - 1)
            for key, value in {**record, "steps": 1.0}.items():
                window[key] = window.get(key, 0.0) + value
            if step % every and step != steps:
                continue
            denominator = window["sum_full"] - window["sum_empty"]
            gained = window["sum_gated"] - window["sum_empty"]
            faith = gained / denominator if denominator else 0.0
            entry = {
                "step": step, "target_edges": self.target_fraction(step) * self.n_edges,
                "expected_edges": record["expected_edges"],
                "objective": window["objective"] / window["steps"],
                "faithfulness": faith,
            }
            history.append(entry)
            bar.set_postfix(
                edges=f"{entry['expected_edges']:.0f}/{entry['target_edges']:.0f}",
                faith=f"{faith:.3f}", loss=f"{entry['objective']:.4f}",
            )
            window = {}
        return history


__all__ = ["OBJECTIVES", "TargetNotReachedError", "learn_circuit"]
