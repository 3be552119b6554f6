"""Enforcement: what the optimizer may change, and what the forward pass may read.

`Enforcement` owns the circuit in force and everything derived from it:

- **gradient restriction** (modes ``gradient``, ``both``, ``random``): the circuit's
  `ctlens.restrict_gradients` context, entered with the run's optimizer so frozen slices
  stay bit-identical under momentum and weight decay. On a ``"batch"`` discovery step the
  restriction is entered after the backward, so :meth:`Enforcement.mask_grads` applies it to
  the gradients already computed.
- **forward masks** (modes ``forward``, ``both``): `ctlens.edge_mask` with mean ablation,
  the means being those of the discovery that chose the circuit; a positional circuit's
  mask reads each batch's span labels (`Enforcement.forward_mask`).
- **the trainable fraction**: real parameters the optimizer may change now.

The restriction itself comes from the run's parallelism
(`ctlens.tuning.parallel.base.Parallelism.restrict`): `ctlens.restrict_gradients`, or on
FSDP-sharded parameters `ctlens.tuning.parallel.sharding.ShardedRestriction` (no hooks:
:meth:`Enforcement.after_backward` masks every backward's gradients).

It also builds the optimizer (over the bridge's parameters, or a LoRA copy's adapters in
``mode="lora"``), so the optimizer the restriction needs is never looked up elsewhere.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from ctlens.circuit import Circuit
from ctlens.tuning import weights as W
from ctlens.tuning.config import TuneConfig
from ctlens.types import Ablation, Mode, Optimizer

if TYPE_CHECKING:
    from ctlens.tuning.parallel.base import Parallelism, Restriction

GRADIENT_MODES: tuple[Mode, ...] = tuple(m for m in Mode if m.restricts_gradients)
FORWARD_MODES: tuple[Mode, ...] = tuple(m for m in Mode if m.masks_forward)


class Enforcement:
    """The circuit in force for one run, its restriction, masks and optimizer.

    Args:
        model: the bridge being tuned.
        config: the run's configuration (mode, optimizer settings, LoRA size).
        parallel: the run's parallelism (the model already wrapped by it), which makes
            the gradient restriction.
    """

    def __init__(self, model: Any, config: TuneConfig, parallel: Parallelism) -> None:
        self.model = model
        self.config = config
        self.parallel = parallel
        self.lora: Any = None
        if config.mode is Mode.LORA:
            from ctlens.tuning.lora import LoraBackend

            self.lora = LoraBackend(model, config.lora_rank, config.lora_alpha)
            self.params: list[torch.nn.Parameter] = self.lora.parameters()
        else:
            self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer
        if config.optimizer is Optimizer.SGD:
            self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas,
                                               weight_decay=config.weight_decay)
        self.circuit: Circuit | None = None
        self.means: torch.Tensor | None = None
        self._restriction: Restriction | None = None

    def enter(self, circuit: Circuit, means: torch.Tensor | None = None) -> None:
        """Make ``circuit`` the one in force (``means``: its forward-mask reference, if any);
        gradient modes enter its restriction."""
        self.circuit = circuit
        if means is not None:
            self.means = means
        self.release()
        if self.config.mode.restricts_gradients:
            self._restriction = self.parallel.restrict(
                self.model, circuit, self.optimizer, self.config.train_embeddings,
                self.config.train_unembedding,
            )

    def mask_grads(self) -> None:
        """Apply the restriction to gradients computed before it was entered."""
        if self._restriction is not None:
            self._restriction.mask_grads()

    def after_backward(self) -> None:
        """Apply the restriction to this backward's gradients where no hook did."""
        if self._restriction is not None:
            self._restriction.after_backward()

    def forward_mask(
        self, spans: torch.Tensor | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """The training forward's edge mask (forward modes with a circuit), else a no-op.
        ``spans``: the batch's ``[batch, seq]`` span labels, for a positional circuit (each
        excluded (edge, span) pair is ablated at that batch's positions of its span)."""
        if not self.config.mode.masks_forward or self.circuit is None:
            return contextlib.nullcontext()
        from ctlens.masking import edge_mask

        return edge_mask(self.model, self.circuit, ablation=Ablation.MEAN, reference=self.means,
                         spans=spans)

    def release(self) -> None:
        """Lift the gradient restriction (every parameter trainable again)."""
        if self._restriction is not None:
            self._restriction.close()
            self._restriction = None

    def trainable_fraction(self) -> float:
        """Fraction of real parameters the optimizer may change under the current setting."""
        if self.lora is not None:
            total = W.count_real_parameters(self.model)
            return sum(p.numel() for p in self.lora.parameters()) / total
        if self._restriction is not None:
            return self._restriction.trainable_fraction()
        return 1.0
