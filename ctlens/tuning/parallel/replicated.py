"""The strategies that keep the whole model in every process: one process, and data
parallelism (`ctlens.tuning.distributed`: each rank runs its shard of the global batch and
the gradients are summed, so all ranks take the same step)."""

from __future__ import annotations

import torch

from ctlens.tuning.parallel.base import Parallelism


class OneProcess(Parallelism):
    """A single process: nothing to divide, gather or reduce."""


class DataParallel(Parallelism):
    """``torch.distributed`` initialised, every rank holding the whole model: the gradients
    of each backward are summed across ranks (losses are normalised by global counts, so the
    sum is the global batch's gradient); rank 0 alone evaluates and writes."""

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is not None:
                self.world.sum_(p.grad)
