"""Sharded circuit-tuning with PyTorch FSDP2 (``TuneConfig(shard="fsdp")``).

`Sharding` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block and to
the HF module the bridge wraps, so each rank stores only its rows (dim 0, split as
``torch.chunk`` splits them) of every parameter, gradient and optimizer state. Each rank
still runs its shard of the global batch (as in `ctlens.tuning.distributed`); FSDP's
reduce-scatter *sums* the gradients (divide factor 1: the loss is already normalised by
global counts).

Gradient restriction acts on the sharded gradients (`ShardedRestriction`): the circuit's
trainable masks are built for this rank's rows only, from parameter shapes
(`ctlens.tuning.local_shards.local_masks`, no gather), applied to the local ``.grad``
before clipping, and frozen local entries are copied back after every optimizer step, so
they stay bit-identical. (A parameter's ``register_hook`` never fires on FSDP2's sharded
parameters, hence no hooks.)

Evaluation runs on every rank through the sharded model (FSDP gathers one block at a time);
`Sharding.reshard` then frees what FSDP2 keeps gathered after a forward without backward.
Only export and consolidated checkpoints (``checkpoint_format="safetensors"``) need the
whole model: they run inside :meth:`Sharding.gathered`, which all-gathers every parameter
on every rank for its duration, so memory then peaks at one full copy of the weights per
rank. Consolidated checkpoints keep the unsharded format (safetensors weights, the
optimizer state in ``torch.optim``'s own layout with every state tensor gathered whole);
``"dcp"`` ones gather nothing (`ctlens.tuning.sharded_checkpoints`).
Either resumes on another number of ranks, sharded or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ctlens.circuit import Circuit
from ctlens.tuning.local_shards import local_masks
from ctlens.tuning.weights import hf_module


def rank_parameter_bytes(model: nn.Module, world_size: int) -> list[int]:
    """Bytes of parameters each of ``world_size`` ranks holds once ``model`` is sharded."""
    sizes = [0] * world_size
    for p in model.parameters():
        rows = torch.empty(p.shape[0] if p.dim() else 1).chunk(world_size)
        per_row = p.numel() // max(1, p.shape[0] if p.dim() else 1) * p.element_size()
        for rank, chunk in enumerate(rows):
            sizes[rank] += len(chunk) * per_row
    return sizes


def check_shardable(model: Any) -> None:
    """Refuse (ValueError) what ``shard="fsdp"`` cannot do: no process group, or parameters
    that are non-contiguous views of another tensor (GPT-2's q/k/v views of ``c_attn``)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "shard='fsdp' needs torch.distributed initialised; launch the run with torchrun "
            "and call torch.distributed.init_process_group first"
        )
    views = [n for n, p in model.named_parameters() if not p.is_contiguous()]
    if views:
        raise ValueError(
            f"shard='fsdp' cannot shard parameters that are non-contiguous views of another "
            f"tensor ({views[0]}, {len(views)} in all; GPT-2's fused c_attn q/k/v); tune this "
            "model unsharded"
        )


class Sharding:
    """FSDP2 sharding of one bridge across the initialised process group (in place);
    `check_shardable` says what it refuses."""

    def __init__(self, model: Any) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        check_shardable(model)
        self.model = model
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        # the root is the HF module: the bridge's run_with_hooks calls its forward directly,
        # which would skip FSDP's hooks on the bridge
        root = hf_module(model)
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
        """This rank's rows of ``full`` (shaped like ``param``'s global shape)."""
        chunks = full.chunk(self.size, dim=0) if full.dim() else (full,)
        local = chunks[self.rank] if self.rank < len(chunks) else full[:0]
        if local.shape != param.to_local().shape:
            raise RuntimeError(
                f"FSDP's local shard {tuple(param.to_local().shape)} is not rows "
                f"{tuple(local.shape)} of {tuple(full.shape)}; this torch shards differently"
            )
        return local

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every sharded state tensor gathered whole (a
        collective: every rank must call it): the layout of an unsharded run's checkpoint."""
        from torch.distributed.tensor import DTensor

        saved = optimizer.state_dict()
        state = {
            i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
            for i, s in saved["state"].items()
        }
        return {"state": state, "param_groups": saved["param_groups"]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             saved: dict[str, Any]) -> None:
        """Load a state from :meth:`optimizer_state`, cutting each whole state tensor to this
        rank's rows of its parameter."""
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
    """Gradient restriction to ``circuit`` on FSDP2-sharded parameters (module docstring).

    Call :meth:`mask_grads` after the backward and before clipping; frozen entries are
    restored by an optimizer step post-hook until :meth:`close`.
    """

    def __init__(self, sharding: Sharding, circuit: Circuit, optimizer: torch.optim.Optimizer,
                 train_embeddings: bool, train_unembedding: bool) -> None:
        masks = local_masks(sharding.model, circuit, train_embeddings, train_unembedding)
        # per parameter, over all ranks: a parameter no rank may change drops its gradient
        # on every rank (the clipping norm and the optimizer state stay the same everywhere)
        counts = torch.tensor([float(keep.sum()) for _, _, keep in masks], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.n_trainable = int(counts.sum())
        """The entries the circuit lets change, over all ranks."""
        self._parts: list[tuple[Any, bool, torch.Tensor, torch.Tensor | None]] = []
        for (_, p, keep), count in zip(masks, counts.tolist(), strict=True):
            old = None if bool(keep.all()) else p.to_local().detach().clone()
            self._parts.append((p, count == 0, keep, old))
        self._handle = optimizer.register_step_post_hook(self._restore)

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
