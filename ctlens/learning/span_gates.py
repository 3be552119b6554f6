"""The gated forward on a positional graph: one gate per (edge, token span).

On a positional graph (`ctlens.graph`, token spans) the gates `G` are ``[n_senders,
n_receivers, n_spans]`` and, at the positions of span ``k``, receiver r reads::

    x_r'[b, t]  =  x_r[b, t]  +  sum over s upstream of r of  (1 - g_srk) (a_s^ref - a_s)[b, t]

with ``k`` the span of token ``(b, t)``; padding (no span) reads ``x_r`` unchanged. A gate
at 1 keeps the (edge, span) pair, at 0 ablates it at that span's positions, exactly as
`ctlens.edge_mask` does with a positional circuit (`ctlens.masking.positional`).

`SpanGatedForward` is `ctlens.learning.gates.GatedForward` with the buffer's cells sorted by
span, as the positional mask keeps them (`ctlens.spans.SpanOrder`, set per batch with
`SpanGatedForward.set_spans`): each sender's ``a^ref - a`` is written once per forward in
sorted order, and each receiver hook applies one matrix product per span on a contiguous
block of cells (`SpanOrder.combine`), then puts the result back in ``(batch, position)``
order. The multiply-adds are the position-free gated forward's. `_SpanGatedSum` is
`_GatedSum` per span: its backward gives gate ``(s, r, k)`` the sum over span ``k``'s cells
of ``grad . (a_s^ref - a_s)`` and hands ``-(1 - G_k) @ grad`` on span ``k``'s cells back to
the live sender outputs. Everything else (references, neuron groups, the final logits) is
the position-free class's.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int

from ctlens.graph import Graph
from ctlens.learning.gates import GatedForward, live_grads
from ctlens.spans import SpanOrder
from ctlens.types import Ablation


class _SpanGatedSum(torch.autograd.Function):
    """Per span ``k``: ``coef_t[k] @ rows[:, cells of k]``, returned in ``(batch, pos)`` order.

    ``coef_t`` is ``(1 - G)`` as ``[spans, cols, n]``; ``rows`` the detached buffer ``a^ref -
    a`` of the ``n`` upstream senders, cells sorted by span (``[n, kept cells, d]``).
    Backward: ``coef_t[k]`` gets ``grad_k @ rows_k^T`` (``grad_k``, ``rows_k``: span ``k``'s
    cells, flattened); each live sender output gets its rows of ``-(coef_t[k]^T @ grad_k)``,
    in ``(batch, pos)`` order (zero on padding), reshaped to its own layout.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        coef_t: torch.Tensor,
        order: SpanOrder,
        rows: torch.Tensor,
        ranges: list[tuple[int, int]],
        *acts: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(coef_t)
        ctx.rows = rows  # written before this product and never again in this forward
        ctx.order = order
        ctx.ranges = ranges
        ctx.layout = [(act.shape, act.ndim) for act in acts]
        return order.natural(order.combine(coef_t, rows))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (coef_t,) = ctx.saved_tensors
        rows: torch.Tensor = ctx.rows
        order: SpanOrder = ctx.order
        cells = order.sorted_cells(grad)  # [cols, kept, d]
        coef_grad = None
        if ctx.needs_input_grad[0]:
            coef_grad = grad.new_zeros(coef_t.shape)
            for k in range(order.n_spans):
                lo, hi = order.bounds[k], order.bounds[k + 1]
                if hi > lo:
                    span_rows = rows[:, lo:hi].reshape(rows.shape[0], -1).to(grad.dtype)
                    coef_grad[k] = cells[:, lo:hi].reshape(cells.shape[0], -1) @ span_rows.T
        grads: list[torch.Tensor | None] = [coef_grad, None, None, None]
        if not ctx.ranges:
            return tuple(grads)
        back = order.combine(coef_t.transpose(1, 2).to(grad.dtype), cells)  # [n, kept, d]
        rows_grad = -order.natural(back)  # [n, batch, pos, d]
        return (*grads, *live_grads(ctx.ranges, ctx.layout, rows_grad))


class SpanGatedForward(GatedForward):
    """`GatedForward` with one gate per (edge, span) of a positional graph (module docstring).

    Use it as `GatedForward`, and before each batch's forwards also call `set_spans` with
    that batch's span labels (`TaskData.spans`). `set_gates` takes ``[n_senders,
    n_receivers, n_spans]`` gates.

    Constructed as `GatedForward` (on a positional graph, any ``mlp_groups``).
    """

    per_span = True
    _order: SpanOrder | None = None  # this batch's cells sorted by span (`set_spans`)

    def set_spans(self, labels: Int[torch.Tensor, "batch seq"]) -> None:
        """The span label of each token of the next forwards (``[batch, seq]``, as
        `TaskData.spans`; -1 on padding)."""
        labels = torch.as_tensor(labels).long()
        if labels.ndim != 2 or bool(((labels < -1) | (labels >= self.graph.n_spans)).any()):
            raise ValueError(f"span labels must be [batch, seq] indices into the graph's "
                             f"spans {list(self.graph.spans)} (-1 on padding)")
        self._order = SpanOrder(labels, self.graph.n_spans)

    def _cell_shape(self, b: int, p: int) -> tuple[int, ...]:
        if self._order is None or self._order.shape != (b, p):
            got = "none" if self._order is None else list(self._order.shape)
            raise RuntimeError(f"the span gates need this forward's span labels ([batch, seq] "
                               f"= {[b, p]}; set for {got}): call set_spans(batch.spans) for "
                               "each batch")
        return (self._order.bounds[-1],)

    def _cells(self, rows: Float[torch.Tensor, "m batch pos d_model"]) -> torch.Tensor:
        assert self._order is not None
        return self._order.sorted_cells(rows)

    def _gated_sum(
        self,
        columns: slice,
        n_up: int,
        parts: list[tuple[int, int, torch.Tensor]],
        b: int,
        p: int,
        dtype: torch.dtype,
    ) -> Float[torch.Tensor, "cols batch pos d_model"]:
        """Per span ``k``, ``(1 - G[:n_up, columns, k]).T`` times span ``k``'s cells of the
        buffer, in ``(batch, pos)`` order; through `_SpanGatedSum` under autograd."""
        assert self._gates is not None and self._buffer is not None
        assert self._order is not None
        coef_t = (1.0 - self._gates[:n_up, columns]).permute(2, 1, 0).to(dtype)  # [k, cols, n]
        rows = self._buffer[:n_up]  # [n_up, kept cells, d_model]
        if torch.is_grad_enabled() and (coef_t.requires_grad or parts):
            ranges = [(start, stop) for start, stop, _ in parts]
            acts = [a for *_, a in parts]
            return _SpanGatedSum.apply(coef_t, self._order, rows, ranges, *acts)
        return self._order.natural(self._order.combine(coef_t, rows))


def gated_forward(
    model: Any,
    graph: Graph,
    ablation: Ablation,
    means: Float[torch.Tensor, "n_senders seq d_model"] | None = None,
) -> GatedForward:
    """The gated forward of ``graph``: `SpanGatedForward` when it is positional, else
    `GatedForward`."""
    kind = SpanGatedForward if graph.positional else GatedForward
    return kind(model, graph, ablation, means)


__all__ = ["SpanGatedForward", "gated_forward"]
