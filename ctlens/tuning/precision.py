"""Mixed precision of a tuning run (``TuneConfig.precision``).

``"bf16"`` and ``"fp16"`` run the *training forward* (and the ``"batch"`` discovery that
records it) under `torch.autocast`; everything else stays fp32:

- the weights the optimizer updates (fp32 master weights) and the optimizer state;
- the loss, taken from the logits cast to fp32, and every backward (run outside autocast,
  so the EAP kernel's products are fp32 too);
- edge scores (the kernel's accumulator is fp32), evaluation, ``"task"`` discovery and
  the forward masks' mean references.

``"fp16"`` scales the loss with a `torch.amp.GradScaler` on the model's device (CUDA, or
the CPU), so small gradients do not flush to zero: gradients are unscaled before clipping,
a step whose gradients overflow is skipped, and discovery's backward is scaled the same
way and its scores divided by the scale (a power of two: exact). The scaler's state (scale,
growth tracker) is saved in every checkpoint, so a resumed ``fp16`` run continues with the
scale it had (checkpoints written before this read as the initial scale).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The autocast context and loss scaler of one run.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``TuneConfig.precision``).
        model: the model to tune; mixed precision needs its parameters in fp32.

    Raises:
        ValueError: mixed precision asked for a model whose weights are not fp32, or any
            precision for float16 weights (trained directly, they overflow to NaN within
            a step or two and lose small updates; bfloat16 has the same size and fp32's
            range).
    """

    def __init__(self, precision: str, model: Any) -> None:
        first = next(model.parameters())
        self.name = precision
        self.device_type = first.device.type
        self.dtype = DTYPES.get(precision)
        if first.dtype == torch.float16:
            raise ValueError(
                "the model's weights are float16, whose range (about +-65,504) overflows when "
                "they are trained directly; load it with dtype='bfloat16' (same memory) or "
                "'float32' (add precision='fp16' for float16 speed with fp32 master weights)"
            )
        if self.dtype is not None and first.dtype != torch.float32:
            raise ValueError(
                f"precision={precision!r} keeps fp32 master weights, but the model's weights "
                f"are {str(first.dtype).removeprefix('torch.')}; load the model in float32 "
                "(load_model's default), or use precision='fp32' to train in the model's dtype"
            )
        self.scaler: Any = None
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device_type)

    def state(self) -> dict[str, Any] | None:
        """The loss scaler's state for a checkpoint (``None`` without one)."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state(self, saved: dict[str, Any] | None) -> None:
        """Restore :meth:`state` (``None``, from older checkpoints: keep the initial scale)."""
        if self.scaler is not None and saved:
            self.scaler.load_state_dict(saved)

    def forward(self) -> contextlib.AbstractContextManager[Any]:
        """The context the training forward runs in (autocast, or nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` times the loss scale (``fp16``), else ``value`` itself."""
        return value if self.scaler is None else self.scaler.scale(value)

    def unscale_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores of a backward through `scale`d values, divided back by the scale."""
        return scores if self.scaler is None else scores / self.scaler.get_scale()

    def step(self, optimizer: torch.optim.Optimizer, params: list[Any],
             grad_clip: float | None) -> None:
        """Clip (after unscaling) and step; under ``fp16`` an overflowing step is skipped."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
