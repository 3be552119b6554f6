"""What a checkpoint holds besides its weights (``state.pt``), shared by both weight layouts.

`CheckpointState` is assembled by the runner; `state_dict` turns it into ``state.pt``'s
contents. The consolidated writer (`ctlens.tuning.checkpoints`) and the DCP writer
(`ctlens.tuning.sharded_checkpoints`) both use it, so neither imports the other for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from ctlens.circuit import Circuit
from ctlens.tuning.config import TuneConfig


@dataclass
class CheckpointState:
    """What a checkpoint holds besides the weights (``state.pt``)."""

    step: int
    wall_time: float
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    ema: torch.Tensor | None
    means: torch.Tensor | None
    last_loss: float | None
    circuit: Circuit | None
    lora: dict[str, Any] | None
    config: TuneConfig
    scaler: dict[str, Any] | None = None  # fp16's loss-scaler state (`Precision.state`)


def state_dict(state: CheckpointState) -> dict[str, Any]:
    """``state.pt``'s contents for ``state`` (either weights layout)."""
    circuit = state.circuit
    return {
        "step": state.step,
        "wall_time": state.wall_time,
        "optimizer": state.optimizer,
        "scheduler": state.scheduler,
        "torch_rng": state.torch_rng,
        "ema": state.ema,
        "means": state.means,
        "last_loss": state.last_loss,
        "circuit_mask": None if circuit is None else circuit.mask,
        "circuit_scores": None if circuit is None else circuit.scores,
        "circuit_metadata": None if circuit is None else json.dumps(circuit.metadata),
        "lora": state.lora,
        "config": json.dumps(state.config.to_dict()),
        "scaler": state.scaler,
    }
