"""Sharded circuit-tuning with PyTorch FSDP2 (``TuneConfig(shard="fsdp")``).

`Sharding` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block and to
the HF module the bridge wraps, so each rank stores only its rows (dim 0, split as
``torch.chunk`` splits them) of every parameter, gradient and optimizer state. Each rank
still runs its shard of the global batch (as in `ctlens.tuning.distributed`); FSDP's
reduce-scatter *sums* the gradients (divide factor 1: the loss is already normalised by
global counts).

Which work gathers the whole model depends on one switch, `local_paths` (recorded as
`ctlens.tuning.parallel.fsdp.FullySharded.local`, the strategy that uses this module):

- models without fused q/k/v (Llama, NeoX, ...): nothing but export and consolidated
  checkpoints gathers. Gradient restriction (`ShardedRestriction`) builds the trainable masks
  for this rank's rows only, from parameter shapes
  (`ctlens.tuning.parallel.local_shards.local_masks`), and sums the counts across ranks;
  evaluation runs on every rank through the sharded model (FSDP gathers one block at a
  time), then `Sharding.reshard` frees what FSDP2 keeps gathered after a forward without
  backward, ``params_moved`` compares each rank's rows with the run's start-weights file
  (`ctlens.tuning.parallel.local_shards.StartWeights`) and rank 0 writes.
- GPT-2 (fused ``c_attn``): the rules are computed on the gathered model (one all-gather per
  rediscovery) and evaluation runs on rank 0 inside :meth:`Sharding.gathered`, against a
  start-weights snapshot every rank keeps.
- every model: ``mode="random"`` with ``random_match="parameters"`` / ``"composition"``
  sizes its matched circuit inside :meth:`Sharding.gathered` (the parameter rules' counts
  read whole parameters).

In both cases the masks are applied to the local ``.grad`` before clipping, and frozen local
entries are copied back after every optimizer step, so they stay bit-identical. (A
parameter's ``register_hook`` never fires on FSDP2's sharded parameters, hence no hooks.)

:meth:`Sharding.gathered` all-gathers every parameter on every rank for its duration, so
memory then peaks at one full copy of the weights per rank. Export and consolidated
checkpoints (``checkpoint_format="safetensors"``) run inside it; consolidated checkpoints keep
the unsharded format (safetensors weights, the optimizer state in ``torch.optim``'s own
layout with every state tensor gathered whole); ``"dcp"`` ones gather nothing
(`ctlens.tuning.sharded_checkpoints`). Either resumes on another number of ranks, sharded or
not.

GPT-2's q/k/v parameters are views of its fused ``c_attn`` weight, which ``fully_shard``
refuses: `ctlens.tuning.parallel.fused` gives them their own storage before sharding and
rebuilds the fused layout inside :meth:`Sharding.gathered`, so files and counts are an
unsharded run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctlens.circuit import Circuit
from ctlens.masking.rules import parameter_rules
from ctlens.tuning import weights as W
from ctlens.tuning.parallel.fused import fused_layers, fused_parameter_ids, refused, unfuse
from ctlens.tuning.parallel.local_shards import local_masks, parameter_count, rows_of


def rank_parameter_bytes(model: nn.Module, world_size: int) -> list[int]:
    """Bytes of parameters each of ``world_size`` ranks holds once ``model`` is sharded
    (GPT-2's fused ``c_attn``, which sharding unregisters, not counted)."""
    sizes = [0] * world_size
    fused = fused_parameter_ids(model)
    for p in model.parameters():
        if id(p) in fused:
            continue
        rows = torch.empty(p.shape[0] if p.dim() else 1).chunk(world_size)
        per_row = p.numel() // max(1, p.shape[0] if p.dim() else 1) * p.element_size()
        for rank, chunk in enumerate(rows):
            sizes[rank] += len(chunk) * per_row
    return sizes


def check_shardable(model: Any) -> None:
    """Refuse (ValueError) what ``shard="fsdp"`` cannot do: no process group, or parameters
    that are non-contiguous views of another tensor (other than GPT-2's q/k/v views of
    ``c_attn``, which `ctlens.tuning.parallel.fused` unfuses)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "shard='fsdp' needs torch.distributed initialised; launch the run with torchrun "
            "and call torch.distributed.init_process_group first"
        )
    parts = {id(getattr(m, "weight", None)) for layer in fused_layers(model)
             for m in layer.parts}
    views = [n for n, p in model.named_parameters()
             if not p.is_contiguous() and id(p) not in parts]
    if views:
        raise ValueError(
            f"shard='fsdp' cannot shard parameters that are non-contiguous views of another "
            f"tensor ({views[0]}, {len(views)} in all); tune this model unsharded"
        )


def local_paths(model: Any) -> bool:
    """Whether a sharded run of ``model`` takes the no-gather paths (module docstring): True
    for models without fused q/k/v, False for GPT-2. Call it on the unsharded model.

    Why GPT-2 gathers: the local trainable masks (`ctlens.masking.rules.rule_openings`) and
    the start-weight rows (`ctlens.tuning.parallel.local_shards.StartWeights`, read from
    ``initial/weights.safetensors``) are in the bridge's fused layout -- q/k/v as views of
    ``c_attn``, whose file tensor is ``[d_model, 3 * d_model]`` -- while a rank holds rows of
    the unfused q/k/v copies (`ctlens.tuning.parallel.fused.unfuse`). Mapping ``c_attn`` columns to
    those shards is not done, so GPT-2 keeps the gathered paths, which are tested to match a
    one-process run.
    """
    return not fused_layers(model)


class Sharding:
    """FSDP2 sharding of one bridge across the initialised process group (in place), of a
    model `check_shardable` accepted."""

    def __init__(self, model: Any) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.model = model
        self.unfused = unfuse(model)
        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        # the root is the HF module: the bridge's run_with_hooks calls its forward directly,
        # which would skip FSDP's hooks on the bridge
        root = W.hf_module(model)
        fully_shard(root)
        self._modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
        for module in self._modules:
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Inside: every parameter is whole (a plain tensor) on every rank; a collective,
        so every rank must enter it, and only then may one rank run forwards alone."""
        for module in self._modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            with refused(self.unfused):
                yield
        finally:
            for module in self._modules:
                module.reshard()
                module.set_reshard_after_forward(True, recurse=False)

    def reshard(self) -> None:
        """Free every gathered parameter: after a forward without backward FSDP2 keeps the
        root's (embeddings, final norm, unembedding) gathered until the next backward."""
        for module in self._modules:
            module.reshard()

    def local_rows(self, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``full`` (shaped like ``param``'s global shape; `rows_of`)."""
        if not full.dim():
            return full
        rows = rows_of(param)
        return full[rows.start : rows.stop]

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every sharded state tensor gathered whole (a
        collective: every rank must call it): the layout of an unsharded run's checkpoint."""
        from torch.distributed.tensor import DTensor

        saved = optimizer.state_dict()
        state = {
            i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
            for i, s in saved["state"].items()
        }
        return self.unfused.to_fused_order({"state": state,
                                            "param_groups": saved["param_groups"]})

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             saved: dict[str, Any]) -> None:
        """Load a state from :meth:`optimizer_state`, already renumbered for this optimizer's
        parameters (``self.unfused.from_fused_order``), cutting each whole state tensor to
        this rank's rows of its parameter."""
        from torch.distributed.tensor import DTensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, entry in saved["state"].items():
            p = params[int(i)]
            state[i] = {
                k: DTensor.from_local(self.local_rows(v, p).clone(), p.device_mesh, p.placements,
                                      shape=p.shape, stride=p.stride())
                if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                for k, v in entry.items()
            }
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


class ShardedRestriction:
    """Gradient restriction to ``circuit`` on FSDP2-sharded parameters (module docstring);
    ``local``: the masks are built for this rank's rows alone (`local_paths`), else on the
    gathered model.

    Call :meth:`mask_grads` after the backward and before clipping; frozen entries are
    restored by an optimizer step post-hook until :meth:`close`.
    """

    def __init__(self, sharding: Sharding, circuit: Circuit, optimizer: torch.optim.Optimizer,
                 train_embeddings: bool, train_unembedding: bool, local: bool) -> None:
        options = (circuit, train_embeddings, train_unembedding)
        masks, total = (_local_masks if local else _gathered_masks)(sharding, *options)
        self.n_trainable = int(sum(count for _, count, _ in masks))
        """The entries the circuit lets change, over all ranks."""
        self._fraction = self.n_trainable / total
        self._parts: list[tuple[Any, bool, torch.Tensor, torch.Tensor | None]] = []
        for p, count, keep in masks:
            old = None if bool(keep.all()) else p.to_local().detach().clone()
            self._parts.append((p, count == 0, keep, old))
        self._handle = optimizer.register_step_post_hook(self._restore)

    def trainable_fraction(self) -> float:
        """`n_trainable` over the model's real parameters (counted when entered: no
        collective)."""
        return self._fraction

    def after_backward(self) -> None:
        """`mask_grads`: no hook zeroes a sharded parameter's gradient (module docstring)."""
        self.mask_grads()

    def mask_grads(self) -> None:
        """Zero frozen entries of the local gradients (drop wholly frozen parameters')."""
        with torch.no_grad():
            for p, nothing, keep, old in self._parts:
                if p.grad is None:
                    continue
                if nothing:  # decided over all ranks, so every rank drops it
                    p.grad = None
                elif old is not None:
                    p.grad.to_local().mul_(keep.to(p.grad.dtype))

    def _restore(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p, _, keep, old in self._parts:
                if old is not None:
                    local = p.to_local()
                    local.copy_(torch.where(keep, local, old))

    def close(self) -> None:
        self._handle.remove()


_Masks = list[tuple[Any, float, torch.Tensor]]
"""Per sharded parameter: the parameter, its trainable count over all ranks, and the
trainable mask of this rank's rows."""


def _local_masks(sharding: Sharding, circuit: Circuit, train_embeddings: bool,
                 train_unembedding: bool) -> tuple[_Masks, int]:
    """The masks of this rank's rows (`local_masks`, no gather) and the parameter count; the
    counts are summed over all ranks (one all-reduce), so a parameter no rank may change
    drops its gradient on every rank (clipping norm and optimizer state stay equal)."""
    masks = local_masks(sharding.model, circuit, train_embeddings, train_unembedding)
    counts = torch.tensor([float(keep.sum()) for _, _, keep in masks], dtype=torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    parts = [(p, count, keep) for (_, p, keep), count in zip(masks, counts.tolist(),
                                                              strict=True)]
    return parts, parameter_count(sharding.model)


def _gathered_masks(sharding: Sharding, circuit: Circuit, train_embeddings: bool,
                    train_unembedding: bool) -> tuple[_Masks, int]:
    """The whole-model rules computed on the gathered model (GPT-2's fused layout rebuilt,
    `local_paths`), cut to this rank's rows, and the real-parameter count."""
    model = sharding.model
    with sharding.gathered():  # the rules read whole parameters (aliasing, shapes)
        names = {id(p): n for n, p in model.named_parameters()}
        rules = parameter_rules(model, circuit, train_embeddings, train_unembedding)
        listed = [(names[id(r.parameter)], r.trainable, r.n_trainable) for r in rules]
        total = W.count_real_parameters(model)
    sharded = dict(model.named_parameters())
    parts = [(sharded[n], float(count), sharding.local_rows(keep, sharded[n]))
             for n, keep, count in listed]
    return parts, total
