"""Gradient restriction (`restrict_gradients`): only the parameters of circuit nodes change.

Which slices a circuit opens is decided by the per-node-kind rules of
`ctlens.masking.rules` (a head sender opens its part of W_O, a q/k/v receiver its head's
slice of W_Q/W_K/W_V, an MLP its own projections; LayerNorms never move; embeddings and
unembedding only when asked). This module enforces them: gradients of frozen entries are
zeroed by tensor hooks, parameters with no trainable entry stop requiring grad, and, given
the optimizer, frozen entries are copied back after every ``step`` (a step post-hook), so
they stay bit-identical under momentum and weight decay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ctlens.circuit import Circuit
from ctlens.masking.rules import ParameterRule, parameter_rules


class GradientRestriction:
    """The handle `restrict_gradients` yields: which parameter entries may change.

    `set_circuit` switches to another circuit in place (after rediscovery) without leaving
    the context: gradient masks and ``requires_grad`` flags are updated and the frozen
    entries are re-snapshotted at their current values.
    """

    def __init__(
        self,
        model: Any,
        circuit: Circuit,
        optimizer: torch.optim.Optimizer | None,
        train_embeddings: bool,
        train_unembedding: bool,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.train_embeddings = train_embeddings
        self.train_unembedding = train_unembedding
        self.rules: list[ParameterRule] = []
        self._flags = {id(p): p.requires_grad for p in model.parameters()}
        self._scales: dict[int, torch.Tensor | None] = {}  # None: gradient passes unchanged
        self._saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []
        self.set_circuit(circuit)
        for rule in self.rules:
            p = rule.parameter
            if self._flags[id(p)]:  # hooks need requires_grad while registering
                flag = p.requires_grad
                p.requires_grad_(True)
                self._handles.append(p.register_hook(self._grad_hook(id(p))))
                p.requires_grad_(flag)
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._restore))

    @property
    def n_trainable(self) -> int:
        """Number of parameter entries that may change."""
        return sum(r.n_trainable for r in self.rules)

    @property
    def n_total(self) -> int:
        """Number of real parameter entries (aliases counted once)."""
        return sum(r.parameter.numel() for r in self.rules)

    def set_circuit(self, circuit: Circuit) -> None:
        """Restrict to ``circuit`` from now on (same model graph)."""
        rules = parameter_rules(self.model, circuit, self.train_embeddings, self.train_unembedding)
        if self.rules and [id(r.parameter) for r in rules] != [id(r.parameter) for r in self.rules]:
            raise RuntimeError("the model's parameters changed inside restrict_gradients")
        self.rules = rules
        in_optimizer = set()
        if self.optimizer is not None:
            in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        saved = []
        for rule in rules:
            p, keep = rule.parameter, rule.trainable
            key = id(p)
            everything, nothing = bool(keep.all()), not bool(keep.any())
            self._scales[key] = None if everything or nothing else keep.to(p.dtype)
            p.requires_grad_(self._flags[key] and not nothing)
            if key in in_optimizer and not everything:
                saved.append((p, keep, p.detach().clone()))
        self._saved = saved

    def _grad_hook(self, key: int) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            scale = self._scales[key]
            return None if scale is None else grad * scale

        return hook

    def _restore(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p, keep, old in self._saved:
                p.copy_(torch.where(keep, p, old))

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p in self.model.parameters():
            p.requires_grad_(self._flags.get(id(p), p.requires_grad))


@contextlib.contextmanager
def restrict_gradients(
    model: Any,
    circuit: Circuit,
    optimizer: torch.optim.Optimizer | None = None,
    train_embeddings: bool = False,
    train_unembedding: bool = False,
) -> Iterator[GradientRestriction]:
    """Inside: only the parameters of circuit nodes change (slice by slice, module docstring).

    Args:
        model: a bridge from `ctlens.load_model`.
        circuit: a `Circuit` of this model's graph. A positional circuit opens a node's
            parameters when the node takes part in a circuit edge at any span: parameters
            are shared across token positions, so they cannot move for one span only.
        optimizer: if given, frozen entries of its parameters are copied back after every
            ``optimizer.step()`` so they stay bit-identical under momentum and weight decay.
            Without it, only gradients are masked (momentum or weight decay may still move
            frozen entries).
        train_embeddings: let the embeddings move when ``input`` sends along a circuit edge.
        train_unembedding: let the unembedding move when ``logits`` is a circuit receiver.

    Yields:
        A `GradientRestriction` (``rules``, ``n_trainable``, ``n_total``,
        ``set_circuit(circuit)``).

    What it changes, and restores on exit (also when the body raises): parameters with no
    trainable entry get ``requires_grad=False``; every mapped parameter gets a gradient
    hook that zeroes frozen entries; the optimizer gets a step post-hook. On exit the hooks
    are removed and every ``requires_grad`` flag is restored. Parameter values, gradients
    already stored and optimizer state are not touched on entry or exit.
    """
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    restriction = GradientRestriction(
        model, circuit, optimizer, train_embeddings, train_unembedding
    )
    try:
        yield restriction
    finally:
        restriction._close()


__all__ = ["GradientRestriction", "restrict_gradients"]
