"""Checkpoints in ``torch.distributed.checkpoint`` (DCP) layout, and optimizer state across
layouts (``TuneConfig(checkpoint_format=...)``).

With ``checkpoint_format="dcp"`` a checkpoint's weights and optimizer state go to
``step_NNNNNN/weights.dcp/`` (`ctlens.run_format.WEIGHTS_DCP`): every rank writes the rows
it holds, so a sharded run never gathers its parameters or optimizer state to save. Keys
are layout-free -- ``model.<HF name>`` and ``optimizer.<HF name>.<state key>`` -- and DCP
reshards on load, so a checkpoint resumes on any number of ranks, sharded or not. The
rest of the checkpoint (``state.pt``: step, scheduler, RNG, circuit; ``circuit.json``) is
rank 0's, as in the consolidated layout, and ``checksums.json`` covers every file,
those inside ``weights.dcp/`` included.

The write stays atomic: rank 0 creates ``checkpoints/.tmp-step_NNNNNN``, every rank writes
its shard there (``dcp.save``: a collective that fails on every rank when one rank's write
fails), then rank 0 adds its files and the checksums and renames the folder into place. The
folder must be on a file system every rank sees (as DCP itself requires).

:func:`load_optimizer` reads the optimizer state of either layout into an unsharded or a
sharded optimizer; a state that fits neither (for example one rank's rows saved by another
sharding) is refused with `ctlens.tuning.weights.CheckpointMismatchError`.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ctlens import run_format as F
from ctlens.tuning import weights as W
from ctlens.tuning.checkpoint_state import CheckpointState, state_dict
from ctlens.tuning.distributed import World
from ctlens.tuning.rundir import RunDir, save_torch

LAYOUT_KEY = "layout"
"""``state.pt``'s ``optimizer[LAYOUT_KEY] == "dcp"``: the optimizer state is in ``weights.dcp``."""


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without a process group DCP reads and writes in one process, as meant: say nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_dcp(folder: Path) -> bool:
    """Whether checkpoint ``folder`` holds its weights in DCP layout."""
    return (folder / F.WEIGHTS_DCP).is_dir()


def parameter_names(model: Any) -> dict[int, str]:
    """``id(parameter) -> HF name`` of the model's parameters (tied ones under their first
    name); the names are the same sharded or not."""
    module = W.hf_module(model)
    return {id(p): W.hf_name(name) for name, p in module.named_parameters()}


def _metadata(folder: Path) -> dict[str, Any]:
    """The tensor entries of ``folder/weights.dcp``; ValueError when it cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(folder / F.WEIGHTS_DCP)).read_metadata()
    except Exception as err:  # a missing or truncated .metadata: the checkpoint is damaged
        raise ValueError(f"{F.WEIGHTS_DCP}/.metadata is unreadable ({type(err).__name__})") \
            from None
    return dict(meta.state_dict_metadata)


def check_dcp(model: Any, folder: Path) -> None:
    """Raise `W.CheckpointMismatchError` unless ``folder``'s DCP weights fit ``model``
    (ValueError when they cannot be read at all). Reads the metadata only; no collective."""
    entries = _metadata(folder)
    saved = {k[len(F.DCP_MODEL):]: tuple(v.size) for k, v in entries.items()
             if k.startswith(F.DCP_MODEL)}
    names = parameter_names(model)
    target = {names[id(p)]: p for p in W.hf_module(model).parameters()}
    W.compare_shapes(folder / F.WEIGHTS_DCP, saved, target)


def save_dcp(path: Path, model: Any, optimizer: torch.optim.Optimizer) -> None:
    """Write the model's parameters and ``optimizer``'s state to the DCP folder ``path``
    (a collective under torch.distributed: every rank writes what it holds)."""
    import torch.distributed.checkpoint as dcp

    names = parameter_names(model)
    flat: dict[str, torch.Tensor] = {}
    for p in W.hf_module(model).parameters():
        flat[F.DCP_MODEL + names[id(p)]] = p.detach()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {key!r} is not a tensor; DCP saves tensors")
                flat[f"{F.DCP_OPTIMIZER}{names[id(p)]}.{key}"] = value
    with _quiet():
        dcp.save(flat, checkpoint_id=str(path), no_dist=_no_dist())


@torch.no_grad()
def load_dcp_weights(model: Any, folder: Path) -> None:
    """Load checkpoint ``folder``'s DCP weights into ``model`` in place (any sharding on
    either side; a collective under torch.distributed)."""
    import torch.distributed.checkpoint as dcp

    check_dcp(model, folder)
    names = parameter_names(model)
    targets = {F.DCP_MODEL + names[id(p)]: p.detach() for p in W.hf_module(model).parameters()}
    with _quiet():
        dcp.load(targets, checkpoint_id=str(folder / F.WEIGHTS_DCP), no_dist=_no_dist())
    for copy in W.split_copies(model):
        copy.scatter()


def optimizer_groups(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What ``state.pt`` keeps of a DCP checkpoint's optimizer: its param groups."""
    return {LAYOUT_KEY: "dcp", "param_groups": optimizer.state_dict()["param_groups"]}


class OptimizerLayout(Protocol):
    """How this run's optimizer lists its state against a consolidated checkpoint's
    (`ctlens.tuning.parallel.base.Parallelism` implements it)."""

    def from_consolidated(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A consolidated (unsharded run's) state renumbered for this optimizer."""

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             saved: dict[str, Any]) -> None:
        """Load a `from_consolidated` state into ``optimizer``."""


def load_optimizer(optimizer: torch.optim.Optimizer, model: Any, saved: dict[str, Any],
                   folder: Path, layout: OptimizerLayout) -> None:
    """Load ``saved`` (``state.pt``'s optimizer entry of checkpoint ``folder``) into
    ``optimizer``, whatever the layout that wrote it and however the model is held now
    (``layout``: the run's parallelism)."""
    if saved.get(LAYOUT_KEY) == "dcp":
        _load_dcp_optimizer(optimizer, model, saved, folder)
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = parameter_names(model)
    live = layout.from_consolidated(saved)
    for i, entry in live["state"].items():
        p = params[int(i)]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                raise W.CheckpointMismatchError(
                    f"{folder / F.STATE}: the optimizer state {key!r} of {names[id(p)]} is "
                    f"{tuple(value.shape)} but the parameter is {tuple(p.shape)}; the "
                    "checkpoint holds a part of it (written by another sharding), which this "
                    "ctlens cannot read: resume from a consolidated or a DCP checkpoint"
                )
    layout.load_optimizer_state(optimizer, live)


def _load_dcp_optimizer(optimizer: torch.optim.Optimizer, model: Any, saved: dict[str, Any],
                        folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    entries = _metadata(folder)
    names = parameter_names(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    by_name: dict[str, dict[str, Any]] = {}
    for key, meta in entries.items():
        if key.startswith(F.DCP_OPTIMIZER):
            name, state_key = key[len(F.DCP_OPTIMIZER):].rsplit(".", 1)
            by_name.setdefault(name, {})[state_key] = meta
    targets: dict[str, torch.Tensor] = {}
    layout: dict[int, dict[str, str]] = {}
    for i, p in enumerate(params):
        for state_key, meta in by_name.get(names[id(p)], {}).items():
            full = f"{F.DCP_OPTIMIZER}{names[id(p)]}.{state_key}"
            if tuple(meta.size) == tuple(p.shape):
                targets[full] = torch.empty_like(p, dtype=meta.properties.dtype,
                                                 requires_grad=False)
            elif len(meta.size) == 0:
                targets[full] = torch.empty((), dtype=meta.properties.dtype)
            else:
                raise W.CheckpointMismatchError(
                    f"{folder / F.WEIGHTS_DCP}: the optimizer state {state_key!r} of "
                    f"{names[id(p)]} is {tuple(meta.size)} but the parameter is "
                    f"{tuple(p.shape)}; this checkpoint does not belong to this model"
                )
            layout.setdefault(i, {})[state_key] = full
    if targets:
        with _quiet():
            dcp.load(targets, checkpoint_id=str(folder / F.WEIGHTS_DCP), no_dist=_no_dist())
    state = {i: {k: targets[full] for k, full in keys.items()} for i, keys in layout.items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def save_dcp_checkpoint(rd: RunDir, model: Any, optimizer: torch.optim.Optimizer,
                        state: CheckpointState, keep: int, world: World) -> None:
    """Write checkpoint ``state.step`` in DCP layout atomically (every rank calls this).

    ``state`` is the `ctlens.tuning.checkpoint_state.CheckpointState` whose ``optimizer`` is
    :func:`optimizer_groups`'s. A failure on any rank raises on every rank, and the
    temporary folder is removed (or left to the next run's clean-up when a rank was killed).
    """
    tmp = rd.checkpoints / f".tmp-{F.step_name(state.step)}"
    steps = rd.checkpoint_steps() if world.is_main else []
    kept = f"the last good checkpoint (step {steps[-1]}) is kept" if steps else \
        "the start weights are kept"
    what = f"the checkpoint of step {state.step}"

    def prepare() -> None:
        with rd.writing(what, kept):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def finish() -> None:
        with rd.writing(what, kept):
            if state.circuit is not None:
                state.circuit.save(tmp / F.CIRCUIT)
            save_torch(state_dict(state), tmp / F.STATE)
            rd.commit_checkpoint(tmp, state.step, keep)

    world.on_main(f"preparing {what}", prepare)
    try:
        save_dcp(tmp / F.WEIGHTS_DCP, model, optimizer)
        world.on_main(f"saving {what}", finish)
    finally:
        if world.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
