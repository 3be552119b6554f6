"""What a forward edge mask precomputes per circuit, and the product that applies it.

`ctlens.masking.forward.EdgeMask.plan` turns a circuit into a `MaskPlan`: one `HookPlan`
per receiver hook (which sender rows it reads, with which 0/1 coefficients and which
reference constant; the forms are explained in `ctlens.masking.forward`). `LiveSum` is the
matrix product a hook applies, with a backward that hands gradients to the live sender
outputs without the shared buffer entering the autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ctlens.circuit import Circuit


class LiveSum(torch.autograd.Function):
    """``coef_t @ rows`` where ``rows`` holds detached copies of live sender outputs.

    Forward: one matrix product on rows of the shared buffer. Backward: ``coef_t.T @ grad``
    gives the gradient of every row used; each live activation gets its rows back, reshaped
    to its own layout. The buffer never enters the autograd graph, so no in-place write into
    it is recorded and the backward costs one product per hook.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        coef_t: torch.Tensor,
        rows: torch.Tensor,
        maps: list[tuple[torch.Tensor, torch.Tensor, int]],
        *acts: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(coef_t)
        ctx.maps = maps
        ctx.layout = [(act.shape, act.ndim) for act in acts]
        ctx.rows_shape = rows.shape
        return coef_t @ rows.reshape(rows.shape[0], rows[0].numel() if len(rows) else 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (coef_t,) = ctx.saved_tensors
        # under autocast the forward product (and so ``grad``) is in the autocast dtype
        rows_grad = (coef_t.T.to(grad.dtype) @ grad).view(ctx.rows_shape)  # [m, b, p, d]
        return (None, None, None, *act_grads(ctx.maps, ctx.layout, rows_grad))


def act_grads(
    maps: list[tuple[torch.Tensor, torch.Tensor, int]],
    layout: list[tuple[torch.Size, int]],
    rows_grad: torch.Tensor,
) -> list[torch.Tensor]:
    """The gradient of each live sender activation from the gradient of the buffer rows a
    product used (``rows_grad`` ``[m, b, p, d]``; ``maps``: per activation, where its rows
    are; ``layout``: its shape and rank)."""
    grads = []
    for (positions, local, n_local), (shape, ndim) in zip(maps, layout, strict=True):
        if len(local) == n_local:  # every row of this sender group was used, in order
            g = rows_grad[positions[0] : positions[0] + n_local]
        else:
            g = rows_grad.new_zeros((n_local, *rows_grad.shape[1:]))
            g[local] = rows_grad[positions]
        g = g[0] if ndim == 3 else g.permute(1, 2, 0, 3)
        grads.append(g.sum_to_size(shape) if tuple(g.shape) != tuple(shape) else g)
    return grads


@dataclass(frozen=True)
class HookPlan:
    """Precomputed ablation for one receiver hook (a group of receiver columns).

    Two equivalent forms; `ctlens.masking.forward.EdgeMask.plan` picks the one that reads
    fewer sender rows:

    - ``excluded``: ``x' = x + C - coef_t @ A[:n]`` with ``coef_t`` the excluded edges and
      ``rows`` the prefix ``0..n``;
    - ``kept``: ``x' = x - S_n + C + coef_t @ A[rows]`` with ``coef_t`` the circuit's (kept)
      edges, ``rows`` the senders that have one, and ``S_n`` the live sum of all ``n``
      upstream senders. Because ``x - S_n`` is the constant biases, this equals the
      excluded form; it reads only the circuit's rows, which is cheap for small circuits.
    """

    kind: str  # "none", "excluded" or "kept"
    n_upstream: int  # senders this hook may read (a prefix of the sender list)
    rows: torch.Tensor | None  # sender rows used (None: the prefix 0..n_rows)
    n_rows: int
    coef_t: torch.Tensor | None  # [n_cols, n_rows] 0/1, model dtype
    const: torch.Tensor | None  # mean ablation: [n_cols, pos, d_model]
    maps: dict[int, tuple[torch.Tensor, torch.Tensor, int]]  # sender group start -> rows
    # a grouped MLP's hook: the columns (groups) with a row in ``coef_t`` (the others read
    # the common input, plus ``common`` under mean ablation in the kept form: [pos, d])
    special: torch.Tensor | None = None
    common: torch.Tensor | None = None


@dataclass(frozen=True)
class MaskPlan:
    """Everything the hooks need to enforce one circuit."""

    circuit: Circuit
    groups: dict[int, HookPlan]  # first receiver column of the hook -> plan
    n_rows: int  # buffer rows any hook reads
    n_prefix: int  # senders whose running sum a "kept" hook needs (0: none)
    computed: dict[int, torch.Tensor]  # grouped MLP layer -> the groups whose output is read

    @property
    def active(self) -> bool:
        return self.n_rows > 0 or self.n_prefix > 0


__all__ = ["HookPlan", "LiveSum", "MaskPlan", "act_grads"]
