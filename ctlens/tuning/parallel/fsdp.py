"""``shard="fsdp"``: the model sharded with PyTorch FSDP2 across the ranks (`FullySharded`).

What changes against a model every rank holds whole (`ctlens.tuning.parallel.base`):

- **checks**, once: a process group must be initialised and every parameter must be
  shardable (`ctlens.tuning.parallel.sharding.check_shardable`).
- **wrapping**: after the step-0 evaluation (its monitor circuit runs a backward on rank 0
  alone) the model is sharded in place (`ctlens.tuning.parallel.sharding.Sharding`) and
  stays sharded after the run.
- **what gathers** is decided once, on the unsharded model, by `local_paths`: models
  without fused q/k/v restrict gradients with masks of each rank's rows, evaluate on every
  rank through the sharded model and compare each rank's rows with the start-weights file;
  GPT-2 (fused ``c_attn``: `ctlens.tuning.parallel.fused`) computes the rules and evaluates
  on the gathered model. Export, consolidated checkpoints and ``mode="random"``'s
  parameter-matched sizing gather every model.
- **gradients** are summed by FSDP's reduce-scatter; the restriction masks them after every
  backward (`ctlens.tuning.parallel.sharding.ShardedRestriction`).
- **``"task"`` discovery** scores all its rows on every rank: FSDP's all-gathers need every
  rank to run the same forwards and backwards.
- **checkpoints**: consolidated ones gather the optimizer state and renumber it as an
  unsharded run's (GPT-2: its ``c_attn`` slots); reading one cuts each state tensor to the
  rank's rows.

Before `wrap` every method behaves as the whole-model default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

from ctlens.circuit import Circuit
from ctlens.tuning.config import TuneConfig
from ctlens.tuning.distributed import World
from ctlens.tuning.parallel.base import Measured, Parallelism, Restriction, T
from ctlens.tuning.parallel.local_shards import StartWeights
from ctlens.tuning.parallel.sharding import (
    ShardedRestriction,
    Sharding,
    check_shardable,
    local_paths,
    rank_parameter_bytes,
)
from ctlens.tuning.rundir import RunDir


class FullySharded(Parallelism):
    """FSDP2 across the initialised process group (see the module docstring)."""

    sharded = True

    def __init__(self, model: Any, config: TuneConfig, world: World) -> None:
        check_shardable(model)
        super().__init__(model, config, world)
        self.local = local_paths(model)
        """Whether rules and evaluation avoid gathering (`local_paths`, decided now on the
        unsharded model: sharding hides the fused layers)."""
        self._sharding: Sharding | None = None

    # ------------------------------------------------------------------ processes

    @classmethod
    def join_processes(cls, device: str | None) -> tuple[str | None, str | None]:
        """Initialise torch.distributed from torchrun's environment: gloo on CPU, NCCL and
        ``cuda:LOCAL_RANK`` for ``cuda``. Returns ``(device, error)``."""
        import torch.distributed as dist

        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return device, ("--shard fsdp runs under torchrun (e.g. torchrun --nproc-per-node "
                            "2 -m ctlens tune --shard fsdp ...); RANK/WORLD_SIZE are not set")
        cuda = device is not None and device.startswith("cuda")
        if cuda and device == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return device, None

    @classmethod
    def leave_processes(cls) -> bool:
        """Leave together: every rank waits for the others, then closes its connections (a
        rank that exits while a peer still talks to it can abort that peer). Rank 0
        reports."""
        import torch.distributed as dist

        rank = dist.get_rank()
        dist.barrier()
        dist.destroy_process_group()
        return rank == 0

    # ------------------------------------------------------------------ the model

    @property
    def task_world(self) -> World:
        return World()

    def run_record(self, model: Any) -> dict[str, Any]:
        return {**super().run_record(model),
                "rank_parameter_bytes": rank_parameter_bytes(model, self.world.size)}

    def wrap(self, model: Any) -> bool:
        if self._sharding is not None:
            return False
        self._sharding = Sharding(model)
        return True

    def gathered(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self._sharding is None else self._sharding.gathered()

    def check_time_steps(self) -> None:
        raise ValueError("time_steps does not shard; time a shard='fsdp' run with run()")

    def _reshard(self) -> None:
        if self._sharding is not None:
            self._sharding.reshard()

    # ------------------------------------------------------------------ training

    def restrict(self, model: Any, circuit: Circuit, optimizer: torch.optim.Optimizer,
                 train_embeddings: bool, train_unembedding: bool) -> Restriction:
        if self._sharding is None:
            return super().restrict(model, circuit, optimizer, train_embeddings,
                                    train_unembedding)
        return ShardedRestriction(self._sharding, circuit, optimizer, train_embeddings,
                                  train_unembedding, self.local)

    # ------------------------------------------------------------------ evaluation

    def start_weights(self, rd: RunDir, model: Any) -> list[torch.Tensor] | StartWeights:
        """Without gathering (`local`): the start-weights file, read whenever
        ``params_moved`` is measured, so no rank holds them; else the default snapshot."""
        if self.local:
            return StartWeights(rd.initial_weights, self._reshard)
        return super().start_weights(rd, model)

    def evaluate(
        self, step: int, measure: Callable[[Circuit | None], Measured],
        write: Callable[[dict[str, Any], Circuit], T],
        monitor: Callable[[], Circuit] | None,
    ) -> T | None:
        """Sharded, the monitor circuit is found on every rank first (one rank alone cannot
        run FSDP's backward); then rank 0 measures on the gathered model, or (`local`)
        every rank measures through the sharded model and rank 0 writes."""
        if self._sharding is None:
            return super().evaluate(step, measure, write, monitor)
        circuit = None if monitor is None else monitor()
        if not self.local:
            with self._sharding.gathered():
                return self.world.on_main(f"evaluating step {step}",
                                          lambda: write(*measure(circuit)))
        measured: Measured = measure(circuit)
        return self.world.on_main(f"writing the evaluation of step {step}",
                                  lambda: write(*measured))

    # ------------------------------------------------------------------ checkpoints

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self._sharding is None:
            return super().optimizer_state(optimizer)
        return self._sharding.optimizer_state(optimizer)

    def from_consolidated(self, saved: dict[str, Any]) -> dict[str, Any]:
        # a sharded GPT-2's optimizer lists its unfused q/k/v instead of c_attn
        if self._sharding is None:
            return saved
        return self._sharding.unfused.from_fused_order(saved)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             saved: dict[str, Any]) -> None:
        if self._sharding is None:
            super().load_optimizer_state(optimizer, saved)
        else:
            self._sharding.load_optimizer_state(optimizer, saved)

