"""Enforcement: what the optimizer may change, and what the forward pass may read.

`Enforcement` owns the circuit in force and everything derived from it:

- **gradient restriction** (modes ``gradient``, ``both``, ``random``): the circuit's
  `ctlens.restrict_gradients` context, entered with the run's optimizer so frozen slices
  stay bit-identical under momentum and weight decay. On a ``"batch"`` discovery step the
  restriction is entered after the backward, so :meth:`Enforcement.mask_grads` applies it to
  the gradients already computed.
- **forward masks** (modes ``forward``, ``both``): `ctlens.edge_mask` with mean ablation,
  the means being those of the discovery that chose the circuit.
- **the trainable fraction**: real parameters the optimizer may change now.

Under ``shard="fsdp"`` the restriction is `ctlens.tuning.sharding.ShardedRestriction` on
the sharded parameters (no hooks: :meth:`Enforcement.mask_grads` runs after every backward).

It also builds the optimizer (over the bridge's parameters, or a LoRA copy's adapters in
``mode="lora"``), so the optimizer the restriction needs is never looked up elsewhere.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ctlens.circuit import Circuit
from ctlens.tuning import weights as W
from ctlens.tuning.config import TuneConfig

GRADIENT_MODES: tuple[str, ...] = ("gradient", "both", "random")
FORWARD_MODES: tuple[str, ...] = ("forward", "both")


class Enforcement:
    """The circuit in force for one run, its restriction, masks and optimizer.

    Args:
        model: the bridge being tuned.
        config: the run's configuration (mode, optimizer settings, LoRA size).
        sharding: the model's `Sharding` under ``shard="fsdp"`` (already applied).
    """

    def __init__(self, model: Any, config: TuneConfig, sharding: Any = None) -> None:
        self.model = model
        self.config = config
        self.sharding = sharding
        self.lora: Any = None
        if config.mode == "lora":
            from ctlens.tuning.lora import LoraBackend

            self.lora = LoraBackend(model, config.lora_rank, config.lora_alpha)
            self.params: list[torch.nn.Parameter] = self.lora.parameters()
        else:
            self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas,
                                               weight_decay=config.weight_decay)
        self.circuit: Circuit | None = None
        self.means: torch.Tensor | None = None
        self._restriction: contextlib.ExitStack | None = None
        self._rules: list[Any] = []
        self._mask_sharded: Any = None
        self._sharded_fraction = 1.0

    def enter(self, circuit: Circuit, means: torch.Tensor | None = None) -> None:
        """Make ``circuit`` the one in force (``means``: its forward-mask reference, if any);
        gradient modes enter its restriction."""
        self.circuit = circuit
        if means is not None:
            self.means = means
        self.release()
        if self.config.mode in GRADIENT_MODES and self.sharding is not None:
            from ctlens.tuning.sharding import ShardedRestriction

            sharded = ShardedRestriction(self.sharding, circuit, self.optimizer,
                                         self.config.train_embeddings,
                                         self.config.train_unembedding)
            self._sharded_fraction = sharded.trainable_fraction
            self._restriction = contextlib.ExitStack()
            self._restriction.callback(sharded.close)
            self._mask_sharded = sharded.mask_grads
        elif self.config.mode in GRADIENT_MODES:
            from ctlens.masking import restrict_gradients

            stack = contextlib.ExitStack()
            self._rules = stack.enter_context(restrict_gradients(
                self.model, circuit, optimizer=self.optimizer,
                train_embeddings=self.config.train_embeddings,
                train_unembedding=self.config.train_unembedding,
            )).rules
            self._restriction = stack

    def mask_grads(self) -> None:
        """Apply the restriction to gradients computed before it was entered (and, sharded,
        to every step's gradients)."""
        if self._restriction is None:
            return
        if self._mask_sharded is not None:
            self._mask_sharded()
            return
        for rule in self._rules:
            p, keep = rule.parameter, rule.trainable
            if p.grad is None:
                continue
            if not bool(keep.any()):
                p.grad = None
            elif not bool(keep.all()):
                p.grad.mul_(keep.to(p.grad.dtype))

    def forward_mask(self) -> contextlib.AbstractContextManager[Any]:
        """The training forward's edge mask (forward modes with a circuit), else a no-op."""
        if self.config.mode not in FORWARD_MODES or self.circuit is None:
            return contextlib.nullcontext()
        from ctlens.masking import edge_mask

        return edge_mask(self.model, self.circuit, ablation="mean", reference=self.means)

    def release(self) -> None:
        """Lift the gradient restriction (every parameter trainable again)."""
        if self._restriction is not None:
            self._restriction.close()
            self._restriction = None
            self._rules = []
            self._mask_sharded = None

    def trainable_fraction(self) -> float:
        """Fraction of real parameters the optimizer may change under the current setting."""
        if self.lora is not None:
            total = W.count_real_parameters(self.model)
            return sum(p.numel() for p in self.lora.parameters()) / total
        if self._mask_sharded is not None:  # no collective: counted when entered
            return self._sharded_fraction
        if self._restriction is not None and self._rules:
            return sum(r.n_trainable for r in self._rules) / W.count_real_parameters(self.model)
        return 1.0
