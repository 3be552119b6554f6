"""Data parallelism with ``torch.distributed`` (any backend; gloo works on CPU).

No wrapper module: each rank runs the same model on its shard of the global batch, losses
and metrics are normalised by *global* counts, and gradients, activation sums and edge
scores are summed with ``all_reduce``. Summing per-rank contributions normalised by global
counts gives exactly the single-process quantity on the concatenated batch (up to float
summation order), so every rank selects the same circuit and takes the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the process group (rank 0 of 1 without distributed)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (strided, so shards differ by at most one)."""
        return rows[self.rank :: self.size]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum over ranks); a no-op on one process."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_scalar(self, value: float) -> float:
        """Sum a Python float over ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.broadcast(t, src=0)
        return int(t)
