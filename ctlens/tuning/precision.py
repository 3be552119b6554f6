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
and a step whose gradients overflow is skipped. ``"batch"`` discovery's own backward (of
the task metric) runs unscaled: the metric's gradients are not small, and the scale
would overflow float16 with them; only a backward shared with the step (the
loss's, ``batch_metric="loss"``) is scaled, and its scores divided by the scale (a power
of two: exact). A step whose fp16 scores still overflow is skipped like one whose
gradients do (`skip`); `skipped` counts both, and the run warns with the count at its end.
The scaler's state (scale, growth tracker) is saved in every checkpoint, so a resumed
``fp16`` run continues with the scale it had (checkpoints written before this read as the
initial scale).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
INITIAL_SCALE = 2.0**12
"""``fp16``'s first loss scale: `torch.amp.GradScaler`'s own 2^16 overflowed the first
step's gradients on the zoo's mini-gpt2 (a skipped step); 2^12 overflows none of the zoo
models' 60-step runs, and the scaler still grows it where gradients stay small."""


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
            self.scaler = torch.amp.GradScaler(self.device_type, init_scale=INITIAL_SCALE)
        self.skipped = 0
        """Steps of this process's run (since its start or resume) skipped on an overflow."""

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
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            self.skipped += self.scaler.get_scale() < scale  # backed off: the step was skipped

    def skip(self, scaled: bool) -> None:
        """Count a step skipped before its update because its fp16 edge scores overflowed;
        when they came from the scaled backward (``scaled``), the scale backs off as on an
        overflowing gradient step."""
        if self.scaler is not None and scaled:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.skipped += 1

    def skipped_warning(self, steps_run: int) -> str:
        """The warning a run ends with when it skipped steps (`skipped`) of ``steps_run``."""
        return (
            f"precision='fp16': {self.skipped} of the {steps_run} steps run were skipped "
            "because float16 overflowed (their gradients or edge scores were not finite; the "
            "loss scale backed off). If that is many, use precision='bf16' (fp32's range) or "
            "'fp32'"
        )

    def overflowed(self, scores: torch.Tensor, valid: torch.Tensor) -> bool:
        """Whether fp16 edge scores are not finite on a ``valid`` edge (an overflow, skipped:
        `skip`); always False at other precisions, where `ctlens.Circuit` refuses them."""
        return self.scaler is not None and not bool(
            torch.isfinite(torch.where(valid, scores, 0.0)).all()
        )
