"""The parallelism interface, with the behaviour of a model every process holds whole.

`Parallelism` is what `ctlens.tuning.runner.CircuitTuner` asks whenever the processes a run
spans matter: its checks (once, at construction), the model's wrapping, what gathers the
model, where evaluation runs, the start weights ``params_moved`` compares with, the
gradient restriction, the gradients' reduction, and how checkpoints are written and their
optimizer state read. Its defaults are those of a model held whole by every process
(`ctlens.tuning.parallel.replicated`); `ctlens.tuning.parallel.fsdp` overrides what
sharding changes. The runner holds no branch on the strategy.

A restriction (`Restriction`) is what a circuit's gradient restriction looks like to
`ctlens.tuning.enforcement.Enforcement`; `HookedRestriction` is `ctlens.restrict_gradients`
(gradient hooks zero the frozen entries as gradients are computed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from ctlens.bridge.families import fused_layers
from ctlens.circuit import Circuit
from ctlens.tuning import checkpoints as C
from ctlens.tuning import sharded_checkpoints as S
from ctlens.tuning import weights as W
from ctlens.tuning.checkpoint_state import CheckpointState
from ctlens.tuning.config import TuneConfig
from ctlens.tuning.distributed import World, check_rows_per_rank
from ctlens.tuning.parallel.local_shards import StartWeights
from ctlens.tuning.rundir import RunDir

T = TypeVar("T")
Measured = tuple[dict[str, Any], Circuit]
"""An evaluation's record and its circuit snapshot (`ctlens.tuning.evaluation.Evaluator`)."""


class Restriction(Protocol):
    """A circuit's gradient restriction in force (entered with the run's optimizer)."""

    def mask_grads(self) -> None:
        """Zero the frozen entries of gradients computed before the restriction began."""

    def after_backward(self) -> None:
        """Zero the frozen entries of this backward's gradients (a no-op where hooks did)."""

    def trainable_fraction(self) -> float:
        """Fraction of the model's real parameters the optimizer may change."""

    def close(self) -> None:
        """Lift the restriction (every parameter trainable again)."""


class HookedRestriction:
    """`ctlens.restrict_gradients` for ``circuit``, entered with ``optimizer`` (frozen
    slices restored after every step) until `close`."""

    def __init__(self, model: Any, circuit: Circuit, optimizer: torch.optim.Optimizer,
                 train_embeddings: bool, train_unembedding: bool) -> None:
        from ctlens.masking import restrict_gradients

        self.model = model
        self._stack = contextlib.ExitStack()
        self.rules = self._stack.enter_context(restrict_gradients(
            model, circuit, optimizer=optimizer, train_embeddings=train_embeddings,
            train_unembedding=train_unembedding,
        )).rules

    def mask_grads(self) -> None:
        for rule in self.rules:
            p, keep = rule.parameter, rule.trainable
            if p.grad is None:
                continue
            if not bool(keep.any()):
                p.grad = None
            elif not bool(keep.all()):
                p.grad.mul_(keep.to(p.grad.dtype))

    def after_backward(self) -> None:
        """Nothing: the restriction's gradient hooks zeroed the frozen entries."""

    def trainable_fraction(self) -> float:
        if not self.rules:
            return 1.0
        return sum(r.n_trainable for r in self.rules) / W.count_real_parameters(self.model)

    def close(self) -> None:
        self._stack.close()


class Parallelism:
    """How one run spans its processes (see the module docstring); the defaults hold for a
    model every process holds whole.

    Construction runs the strategy's checks, once: a ``checkpoint_format="dcp"`` run of a
    model with fused q/k/v is refused (its shards would be named after the unfused q/k/v),
    and so is a global batch with fewer rows than processes.
    """

    sharded: bool = False
    """Whether each process holds only a part of the model (``run.json``'s ``sharded``)."""

    def __init__(self, model: Any, config: TuneConfig, world: World) -> None:
        self.world = world
        if config.checkpoint_format == "dcp" and fused_layers(model):
            raise ValueError(
                "checkpoint_format='dcp' does not support models with fused q/k/v (GPT-2's "
                "c_attn) yet: its shards would be named after the unfused q/k/v and could not "
                "resume unsharded; use checkpoint_format='safetensors' (the default)"
            )
        check_rows_per_rank(config.batch_size, world.size)

    # ------------------------------------------------------------------ processes

    @classmethod
    def join_processes(cls, device: str | None) -> tuple[str | None, str | None]:
        """What ``ctlens tune`` does before loading the model: ``(device, error)``."""
        return device, None

    @classmethod
    def leave_processes(cls) -> bool:
        """What ``ctlens tune`` does after the run; whether this process reports it."""
        return True

    # ------------------------------------------------------------------ the model

    @property
    def task_world(self) -> World:
        """The ranks ``"task"`` discovery divides its rows among."""
        return self.world

    def run_record(self, model: Any) -> dict[str, Any]:
        """``run.json``'s entries on the processes (read before `wrap`)."""
        return {"world_size": self.world.size, "sharded": self.sharded,
                "rank_parameter_bytes": None}

    def share_start_weights(self, rd: RunDir, model: Any) -> None:
        """A fresh run: every rank but 0 loads the start weights rank 0 just wrote, so all
        ranks start from the same model (one process: nothing to do)."""
        if not self.world.is_main:
            W.load_weights(model, rd.initial_weights)

    def wrap(self, model: Any) -> bool:
        """Prepare ``model`` for training across the processes (after the step-0
        evaluation); True when its parameters were replaced, so the optimizer is rebuilt."""
        return False

    def gathered(self) -> contextlib.AbstractContextManager[Any]:
        """Inside: every parameter whole on every process (a collective when sharded)."""
        return contextlib.nullcontext()

    def check_time_steps(self) -> None:
        """Refuse `CircuitTuner.time_steps` where it cannot run (it never wraps the model)."""

    # ------------------------------------------------------------------ training

    def restrict(self, model: Any, circuit: Circuit, optimizer: torch.optim.Optimizer,
                 train_embeddings: bool, train_unembedding: bool) -> Restriction:
        """The gradient restriction to ``circuit`` (with ``optimizer``'s step post-hook)."""
        return HookedRestriction(model, circuit, optimizer, train_embeddings,
                                 train_unembedding)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Make every process's gradients the global batch's (after each backward)."""

    # ------------------------------------------------------------------ evaluation

    def start_weights(self, rd: RunDir, model: Any) -> list[torch.Tensor] | StartWeights:
        """What ``params_moved`` compares with: a snapshot of the run's start weights."""
        return C.initial_snapshot(rd, model)

    def evaluate(
        self, step: int, measure: Callable[[Circuit | None], Measured],
        write: Callable[[dict[str, Any], Circuit], T],
        monitor: Callable[[], Circuit] | None,
    ) -> T | None:
        """Measure step ``step`` and write it (rank 0's result; None elsewhere).

        ``measure(monitor_circuit)`` evaluates; ``monitor`` (None while a circuit is in
        force) finds the snapshot circuit, here inside ``measure`` on rank 0 alone.
        """
        return self.world.on_main(f"evaluating step {step}", lambda: write(*measure(None)))

    # ------------------------------------------------------------------ checkpoints

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state of a consolidated checkpoint (an unsharded run's layout)."""
        return optimizer.state_dict()

    def from_consolidated(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A consolidated optimizer state renumbered for this run's optimizer."""
        return saved

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             saved: dict[str, Any]) -> None:
        """Load a `from_consolidated` state into ``optimizer``."""
        optimizer.load_state_dict(saved)

    def save_checkpoint(
        self, rd: RunDir, model: Any, optimizer: torch.optim.Optimizer,
        state: Callable[[dict[str, Any]], CheckpointState], checkpoint_format: str,
        keep: int,
    ) -> None:
        """Write a checkpoint atomically: ``state(optimizer entry)`` gives its ``state.pt``.

        ``"dcp"``: every rank writes its own part (`ctlens.tuning.sharded_checkpoints`);
        ``"safetensors"``: rank 0 writes the whole model, gathered for the write.
        """
        if checkpoint_format == "dcp":
            saved = state(S.optimizer_groups(optimizer))
            S.save_dcp_checkpoint(rd, model, optimizer, saved, keep, self.world)
            return
        saved = state(self.optimizer_state(optimizer))
        with self.gathered():
            self.world.on_main(f"saving the checkpoint of step {saved.step}",
                               lambda: C.save_checkpoint(rd, model, saved, keep))

    def load_optimizer(self, optimizer: torch.optim.Optimizer, model: Any,
                       saved: dict[str, Any], folder: Path) -> None:
        """Load checkpoint ``folder``'s optimizer entry ``saved``, whichever layout wrote it."""
        S.load_optimizer(optimizer, model, saved, folder, self)

