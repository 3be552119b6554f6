"""What a rank of a sharded run computes from its own rows, without gathering the model.

Under ``shard="fsdp"`` each rank holds rows ``torch.chunk`` gives it (dim 0) of every
parameter (`ctlens.tuning.parallel.sharding`). Two things the tuner needs per rediscovery
and per evaluation are computed here from those rows alone:

- **the trainable masks** of a circuit (`local_masks`): `ctlens.masking.rules` names the
  slices a circuit opens from the model's structure and parameter shapes only
  (`rule_openings`), so each slice is cut to this rank's rows and written into a mask of the
  local shape; no whole mask and no whole parameter is ever built.
- **``params_moved``** (`StartWeights`): the start weights are read from the run's
  ``initial/weights.safetensors`` one tensor at a time -- on a sharded model only this
  rank's rows of it -- and compared with the local rows; the counts are summed across
  ranks. No rank keeps the start weights in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Bool
from torch import nn

from ctlens.bridge.families import split_copies
from ctlens.circuit import Circuit
from ctlens.masking.rules import rule_openings
from ctlens.tuning import weights as W


def _is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def local(p: torch.Tensor) -> torch.Tensor:
    """The rows of ``p`` this rank holds (``p`` itself when it is not sharded)."""
    return p.to_local() if _is_sharded(p) else p


def check_resharded(params: list[torch.Tensor]) -> bool:
    """Whether ``params`` are sharded; RuntimeError when only some are (a module left
    gathered after a forward: call `ctlens.tuning.parallel.sharding.Sharding.reshard`
    first)."""
    sharded = [_is_sharded(p) for p in params]
    if any(sharded) and not all(sharded):
        raise RuntimeError(
            "some parameters are gathered and others sharded; the model must be resharded "
            "(Sharding.reshard) before its local rows are read"
        )
    return any(sharded)


def rows_of(p: torch.Tensor) -> range:
    """The global rows (dim 0) of ``p`` this rank holds: ``torch.chunk``'s split of them
    over the parameter's device mesh, all of them when ``p`` is not sharded."""
    n = p.shape[0] if p.dim() else 1
    if not _is_sharded(p):
        return range(n)
    mesh = p.device_mesh
    size, rank = mesh.size(), mesh.get_local_rank()
    width = -(-n // size)
    start = min(rank * width, n)
    rows = range(start, min(start + width, n))
    if (p.to_local().shape[0] if p.dim() else 1) != len(rows):
        raise RuntimeError(
            f"FSDP's local shard {tuple(p.to_local().shape)} is not rows {rows.start}:"
            f"{rows.stop} of {tuple(p.shape)}; this torch shards differently"
        )
    return rows


def local_index(index: tuple[Any, ...], rows: range, n: int) -> tuple[Any, ...] | None:
    """``index`` (into a parameter with ``n`` rows) as an index into its local ``rows``;
    None when it selects none of them."""
    if index == (...,):
        return None if len(rows) == 0 else index
    first = index[0]
    if not isinstance(first, slice):
        raise ValueError(f"cannot cut the rule's index {index!r} to local rows: dim 0 must be "
                         "a slice")
    lo, hi, step = first.indices(n)
    if step != 1:
        raise ValueError(f"cannot cut the strided rule index {index!r} to local rows")
    lo, hi = max(lo, rows.start), min(hi, rows.stop)
    if lo >= hi:
        return None
    return (slice(lo - rows.start, hi - rows.start), *index[1:])


def local_masks(
    model: Any, circuit: Circuit, train_embeddings: bool, train_unembedding: bool
) -> list[tuple[str, nn.Parameter, Bool[torch.Tensor, "..."]]]:
    """``(name, parameter, trainable)`` for every parameter of ``model`` in
    ``named_parameters()`` order, ``trainable`` covering this rank's rows only (True: the
    circuit lets the entry change); the masks of `ctlens.masking.rules.parameter_rules`,
    cut to the local rows without building them whole. Needs no collective."""
    mapped, openings = rule_openings(model, circuit, train_embeddings, train_unembedding)
    masks: dict[int, tuple[str, nn.Parameter, torch.Tensor]] = {}
    check_resharded(list(model.parameters()))
    for name, p in model.named_parameters():
        part = local(p)
        masks[id(p)] = (name, p, torch.zeros(part.shape, dtype=torch.bool, device=part.device))
    if any(id(p) not in masks for p in mapped):
        raise ValueError(
            "restrict_gradients mapped a weight that model.named_parameters() does not list; "
            "the bridge layout is not the one ctlens knows"
        )
    for p, index in openings:
        cut = local_index(index, rows_of(p), p.shape[0] if p.dim() else 1)
        if cut is not None:
            masks[id(p)][2][cut] = True
    return list(masks.values())


def parameter_count(model: Any) -> int:
    """Number of parameters of a sharded model (global shapes; FSDP2's parameters never
    alias each other, so each counts once)."""
    return sum(p.numel() for p in model.parameters())


class StartWeights:
    """The run's start weights, read from its initial-weights file (``path``) whenever
    ``params_moved`` is measured, so that no rank holds a copy of them. ``reshard`` (if
    given) runs first: it frees what FSDP2 keeps gathered after a forward without backward
    (`ctlens.tuning.parallel.sharding.Sharding.reshard`), so the local rows are read."""

    def __init__(self, path: Path, reshard: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self._reshard = reshard

    @torch.no_grad()
    def moved_fraction(self, model: Any) -> float:
        """Fraction of the model's parameters that differ (bitwise) from the start weights.

        On a sharded model every rank compares its rows and the counts are summed (a
        collective: every rank must call it); on a whole one it compares whole tensors, one
        at a time, in this process alone.
        """
        from safetensors import safe_open

        if self._reshard is not None:
            self._reshard()
        module = W.hf_module(model)
        named = {W.hf_name(n): p for n, p in module.named_parameters(remove_duplicate=False)}
        sharded = check_resharded(list(named.values()))
        if not sharded:
            for copy in split_copies(model):  # GPT-NeoX: the fused qkv from its copies
                copy.gather()
        seen: set[int] = set()
        moved, total = torch.zeros(1, dtype=torch.float64), 0
        with safe_open(str(self.path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                p = named.get(key)
                if p is None or id(p) in seen:  # a buffer, or the other name of a tied weight
                    continue
                seen.add(id(p))
                rows = rows_of(p)
                start = handle.get_slice(key)[rows.start : rows.stop] if sharded and p.dim() \
                    else handle.get_tensor(key)
                moved += int((local(p).detach().cpu() != start).sum())
                total += p.numel()  # global sizes, also on a sharded model
        missing = [n for n, p in named.items() if id(p) not in seen]
        if missing:
            raise RuntimeError(
                f"{self.path} holds no start weights for {missing[:3]}; it does not belong to "
                "this model"
            )
        if sharded and dist.is_initialized():
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return float(moved) / max(1, total)
