"""Positional forward masks: a kept (edge, span) pair acts only at its span's positions.

For a positional circuit (token spans, `ctlens.graph`) a receiver hook's coefficients come
per span, ``coef_t`` ``[spans, cols, rows]``, and its input becomes (excluded form; the
kept form of `ctlens.masking.forward` likewise)::

    x_r'[b, t]  =  x_r[b, t]  +  (C_k - coef_k @ A[:, b, t])     with k the span of (b, t)

`EdgeMask` keeps the sender buffer's cells sorted by span (`ctlens.spans.SpanOrder`, set
for each batch with `EdgeMask.set_spans`), so span ``k``'s product is one matrix product on
a contiguous block of cells (`SpanOrder.combine`); the result is put back in ``(batch,
position)`` order before it is added to the input. The multiply-adds are those of a
position-free mask reading the union of the spans' rows. `SpanLiveSum` is `LiveSum` per
span: its backward hands each live sender output the gradient of its cells.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int

from ctlens.masking.plans import LiveSum, act_grads
from ctlens.spans import SpanOrder


class SpanLiveSum(torch.autograd.Function):
    """``coef_k @ rows[:, cells of k]`` for every span ``k``, in ``(batch, pos)`` order, where
    ``rows`` (``[n, kept cells, d]``, cells sorted by span) holds detached copies of live
    sender outputs; the backward returns each live activation the gradient of its rows."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        coef_t: torch.Tensor,
        order: SpanOrder,
        rows: torch.Tensor,
        maps: list[tuple[torch.Tensor, torch.Tensor, int]],
        *acts: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(coef_t)
        ctx.order = order
        ctx.maps = maps
        ctx.layout = [(act.shape, act.ndim) for act in acts]
        return order.natural(order.combine(coef_t, rows))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (coef_t,) = ctx.saved_tensors
        order: SpanOrder = ctx.order
        cells = order.sorted_cells(grad)  # [cols, kept, d]
        rows_grad = order.natural(order.combine(coef_t.transpose(1, 2).to(grad.dtype), cells))
        return (None, None, None, None, *act_grads(ctx.maps, ctx.layout, rows_grad))


def mix_rows(
    coef_t: Float[torch.Tensor, "*spans cols n"],
    order: SpanOrder | None,
    rows: torch.Tensor,
    maps: list[tuple[torch.Tensor, torch.Tensor, int]],
    acts: list[torch.Tensor],
) -> Float[torch.Tensor, "cols batch pos d"]:
    """A hook's ``coef_t @ rows`` per cell: position-free (``order`` None, ``rows`` ``[n, b,
    p, d]``, through `LiveSum`) or each cell's rows mixed by its span's coefficients
    (``rows`` ``[n, kept cells, d]`` sorted by span; zero on padding; through `SpanLiveSum`).
    Live (gradients to ``acts``, located by ``maps``) when ``acts`` are given under autograd."""
    live = bool(acts) and torch.is_grad_enabled()
    if order is not None:
        if live:
            return SpanLiveSum.apply(coef_t, order, rows, maps, *acts)
        return order.natural(order.combine(coef_t, rows))
    n, b, p, d = rows.shape
    if live:
        product = LiveSum.apply(coef_t, rows, maps, *acts)
    else:
        product = coef_t @ rows.reshape(n, b * p * d)
    return product.view(-1, b, p, d)


def span_constant(
    const: Float[torch.Tensor, "spans cols seq d"], labels: Int[torch.Tensor, "batch pos"]
) -> Float[torch.Tensor, "cols batch pos d"]:
    """Each cell's mean-ablation constant: its span's, at its position (padding: span 0's)."""
    b, p = labels.shape
    positions = torch.arange(p, device=labels.device)[None].expand(b, p)
    return const.permute(1, 0, 2, 3)[:, labels.clamp(min=0), positions]


def span_coefficients(block: torch.Tensor) -> torch.Tensor:
    """A hook's 0/1 coefficients ``[cols, rows]`` (position-free) or ``[spans, cols, rows]``
    from its ``[rows, cols(, spans)]`` block of the circuit's (or excluded) edges."""
    return block.T if block.ndim == 2 else block.permute(2, 1, 0)


__all__ = ["SpanLiveSum", "mix_rows", "span_coefficients", "span_constant"]
