"""Parallelism strategies: how one circuit-tuning run spans its processes.

One small type per strategy, chosen once from the run's `TuneConfig` and process group
(`parallelism`), owns everything the processes change -- its checks, the model's wrapping,
gathering, where evaluation runs, the start weights, the gradient restriction and
reduction, and checkpoint writing -- so `ctlens.tuning.runner` and
`ctlens.tuning.discovery` hold no branch on it:

- `OneProcess` (`ctlens.tuning.parallel.replicated`): a single process.
- `DataParallel` (same module): ``torch.distributed`` initialised, every rank holding the
  whole model, gradients summed (`ctlens.tuning.distributed`).
- `FullySharded` (`ctlens.tuning.parallel.fsdp`): ``shard="fsdp"``, FSDP2 over the ranks
  (`ctlens.tuning.parallel.sharding`, `ctlens.tuning.parallel.local_shards`), GPT-2's fused
  q/k/v unfused while sharded (`ctlens.tuning.parallel.fused`).

The interface and its whole-model defaults are `ctlens.tuning.parallel.base.Parallelism`.
"""

from __future__ import annotations

from typing import Any

from ctlens.tuning.config import TuneConfig
from ctlens.tuning.distributed import World
from ctlens.tuning.parallel.base import HookedRestriction, Parallelism, Restriction
from ctlens.tuning.parallel.fsdp import FullySharded
from ctlens.tuning.parallel.replicated import DataParallel, OneProcess
from ctlens.types import Shard


def strategy_type(config: TuneConfig, world: World | None = None) -> type[Parallelism]:
    """The strategy of ``config`` in ``world`` (default: this process's; ``ctlens tune``
    asks before a process group exists, which only ``shard`` starts)."""
    if config.shard is Shard.FSDP:
        return FullySharded
    world = World.current() if world is None else world
    return DataParallel if world.active else OneProcess


def parallelism(model: Any, config: TuneConfig, world: World) -> Parallelism:
    """The strategy of a run of ``model`` under ``config`` in ``world``, its checks done."""
    return strategy_type(config, world)(model, config, world)


__all__ = [
    "DataParallel",
    "FullySharded",
    "HookedRestriction",
    "OneProcess",
    "Parallelism",
    "Restriction",
    "parallelism",
    "strategy_type",
]
