"""Data parallelism with ``torch.distributed`` (any backend; gloo works on CPU).

No wrapper module: each rank runs the same model on its shard of the global batch, losses
and metrics are normalised by *global* counts, and gradients, activation sums and edge
scores are summed with ``all_reduce``. Summing per-rank contributions normalised by global
counts gives exactly the single-process quantity on the concatenated batch (up to float
summation order), so every rank selects the same circuit and takes the same step.

Only rank 0 touches the run directory. Its file work runs through :meth:`World.on_main`,
which tells the other ranks whether it succeeded: an error on rank 0 (a refused output
directory, a full disk) then stops every rank with an error instead of leaving them
waiting forever at the next collective. A rank that dies mid-run (an error, a kill) closes its
connections; the collective the others are in then fails, and :meth:`World.peer_failures`
turns that backend error into one `RankFailedError` naming the step, instead of a gloo or
NCCL traceback. (A rank that hangs without dying holds the others until the process
group's own ``timeout``, as given to ``init_process_group``.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Raised on the other ranks when rank 0 failed in work that only it does, or when
    another rank stopped in the middle of a collective."""


# what a backend says when a peer process went away (gloo's TCP pairs, NCCL's watchdog)
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe",
              "nccl communicator was aborted", "timed out")


def check_rows_per_rank(batch_size: int, ranks: int) -> None:
    """Refuse a global batch smaller than the number of ranks (`CircuitTuner`; `ctlens.plan`
    plans with the same check)."""
    if batch_size < ranks:
        raise ValueError(
            f"batch_size={batch_size} is smaller than the number of ranks ({ranks}); every "
            "rank needs at least one row"
        )


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

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.broadcast(t, src=0)
        return int(t)

    def on_main(self, what: str, work: Callable[[], T]) -> T | None:
        """Run ``work`` on rank 0 only, then tell every rank whether it succeeded.

        Returns ``work()``'s result on rank 0 and None elsewhere. When ``work`` raises,
        rank 0 re-raises its error and every other rank raises :class:`RankFailedError`
        naming ``what``. Also a synchronisation point: no rank returns before rank 0 is done.
        """
        if not self.active:
            return work()
        result: T | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = work()
            except BaseException as exc:  # reported to the other ranks, then re-raised
                error = exc
        failed = self.broadcast_int(int(error is not None))
        if error is not None:
            raise error
        if failed:
            raise RankFailedError(
                f"rank 0 failed while {what}; its error message is in rank 0's output"
            )
        return result

    @contextlib.contextmanager
    def peer_failures(self, what: str) -> Iterator[None]:
        """Turn a collective's failure because another rank stopped, during ``what``, into
        `RankFailedError`; every other error passes unchanged."""
        try:
            yield
        except RankFailedError:
            raise
        except RuntimeError as err:
            gone = isinstance(err, dist.DistError) or any(
                mark in str(err).lower() for mark in _PEER_GONE)
            if not (self.active and gone):
                raise
            raise RankFailedError(
                f"rank {self.rank}: another rank stopped while this one was {what} (its "
                "error is in its own output); the newest checkpoint is intact: fix the cause "
                "and run the same command again to resume"
            ) from err
