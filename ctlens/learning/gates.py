"""The gated forward: every edge ``s -> r`` of the graph scaled by a gate ``g_sr`` in [0, 1].

The residual stream is a sum, so receiver r's input is ``x_r = sum over senders s before r
of a_s`` (plus constant biases). With a gate per edge the receiver reads instead::

    x_r'  =  x_r  +  sum over s upstream of r of  (1 - g_sr) (a_s^ref - a_s)

so ``g_sr = 1`` keeps the edge, ``g_sr = 0`` replaces the sender's contribution by its
ablation reference (exactly what `ctlens.edge_mask` does to an edge outside the circuit)
and values in between interpolate. ``a_s^ref`` is the corrupt run's activation, the
per-position mean, or zero (``ablation=``, read as everywhere by
`ctlens.reference.resolve_reference`).

Per forward pass, the sender hooks (`ctlens.bridge.hooks.sender_hooks`) write
``a_s^ref - a_s`` (detached) into one ``[n_senders, batch, pos, d_model]`` buffer in graph
order, so the senders a receiver may read are a prefix of it, and keep the live outputs.
Each receiver hook (`ctlens.bridge.hooks.receiver_hooks`) then adds one matrix product,
``(1 - G[:n, cols]).T @ buffer[:n]``: one product per receiver hook, no loop over edges.
With autograd on, the product is a small custom autograd function (`_GatedSum`) whose
backward gives the gates' gradient (``-grad @ buffer.T``) and hands ``-(1 - G) @ grad``
back to the live sender outputs, so gates upstream of a sender learn through it; the
shared buffer never enters the autograd graph. At ``G = 1`` every product is zero and the
receiver input is returned bit for bit; at ``G = 0`` the model is the fully ablated one.
On a graph with MLP neuron groups, a group sender is reported like a head and a grouped
MLP's receiver hook hands every group its own gated copy of the MLP input (a
`ctlens.bridge.mlp_groups.GroupedInput`). Positional graphs (a gate per edge and token span)
use the subclass `ctlens.learning.span_gates.SpanGatedForward`, which changes only the
buffer's cell order (`_cells`) and the product (`_gated_sum`).

Gates are hard-concrete variables (Louizos et al. 2018, as in Edge Pruning, Bhaskar et al.
2024): `sample_gates` draws ``z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta)
(zeta - gamma) + gamma, 0, 1)`` with ``u ~ U(0, 1)``, which is exactly 0 or 1 with positive
probability, and `open_probability` is ``P(z > 0)``, the expected-size term of the L0
penalty.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float

from ctlens.bridge.hooks import (
    EdgeHooks,
    eval_mode,
    final_logits,
    flat,
    run_to_final_residual,
    sender_hooks,
)
from ctlens.bridge.mlp_groups import GroupedInput
from ctlens.graph import Graph
from ctlens.types import Ablation

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
"""Hard-concrete temperature and stretch interval (Louizos et al.; Edge Pruning's values)."""
_OPEN_SHIFT = BETA * math.log(-GAMMA / ZETA)


def sample_gates(
    log_alpha: Float[torch.Tensor, "n_senders n_receivers"], generator: torch.Generator
) -> Float[torch.Tensor, "n_senders n_receivers"]:
    """One hard-concrete draw per gate, differentiable in ``log_alpha`` (noise from
    ``generator``, a CPU generator, so a seed fixes every draw on every device)."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    noise = (u.log() - (-u).log1p()).to(log_alpha.device, log_alpha.dtype)
    stretched = torch.sigmoid((noise + log_alpha) / BETA) * (ZETA - GAMMA) + GAMMA
    return stretched.clamp(0.0, 1.0)


def open_probability(
    log_alpha: Float[torch.Tensor, "n_senders n_receivers"],
) -> Float[torch.Tensor, "n_senders n_receivers"]:
    """``P(gate > 0)`` of each hard-concrete gate (its share of the expected circuit size)."""
    return torch.sigmoid(log_alpha - _OPEN_SHIFT)


def live_grads(
    ranges: list[tuple[int, int]],
    layout: list[tuple[torch.Size, int]],
    rows_grad: Float[torch.Tensor, "n batch pos d_model"],
) -> list[torch.Tensor]:
    """Each live sender output's gradient from its buffer rows' (``ranges``: its rows;
    ``layout``: its shape and rank; a ``[b, p, d]`` output has one row, a per-head one
    ``[b, p, heads, d]`` one row per head)."""
    grads = []
    for (start, stop), (shape, ndim) in zip(ranges, layout, strict=True):
        g = rows_grad[start:stop]
        g = g[0] if ndim == 3 else g.permute(1, 2, 0, 3)
        grads.append(g.sum_to_size(shape) if tuple(g.shape) != tuple(shape) else g)
    return grads


class _GatedSum(torch.autograd.Function):
    """``coef_t @ rows``: ``coef_t = (1 - G)^T`` ``[cols, n]``, ``rows`` the detached buffer
    ``a^ref - a`` of the ``n`` upstream senders, flattened to ``[n, batch * pos * d]``.

    Backward: the gates get ``grad @ rows^T``; each live sender output gets its rows of
    ``-(coef_t^T @ grad)`` (``rows`` holds ``a^ref - a``), reshaped to its own layout.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        coef_t: torch.Tensor,
        rows: torch.Tensor,
        shape: tuple[int, int, int],
        ranges: list[tuple[int, int]],
        *acts: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(coef_t)
        ctx.rows = rows  # written before this product and never again in this forward
        ctx.shape_bpd = shape
        ctx.ranges = ranges
        ctx.layout = [(act.shape, act.ndim) for act in acts]
        return coef_t @ rows

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (coef_t,) = ctx.saved_tensors
        rows: torch.Tensor = ctx.rows
        coef_grad = (grad @ rows.T.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        grads: list[torch.Tensor | None] = [coef_grad, None, None, None]
        if not ctx.ranges:
            return tuple(grads)
        b, p, d = ctx.shape_bpd
        rows_grad = -(coef_t.T.to(grad.dtype) @ grad).view(rows.shape[0], b, p, d)
        return (*grads, *live_grads(ctx.ranges, ctx.layout, rows_grad))


class GatedForward(EdgeHooks):
    """Hooks that run a model with one gate per edge (module docstring).

    Install `hooks` (``with model.hooks(fwd_hooks=gated.hooks()):``), then set the gates
    with `set_gates` and the reference with `use_reference` (corrupt ablation; per batch)
    before each forward. Without gates every edge is kept. `paused` runs the plain model.

    Args:
        model: a bridge from `ctlens.load_model`.
        graph: the model's graph (any ``mlp_groups``).
        ablation: what a closed gate replaces a sender with.
        means: ``[n_senders, seq, d_model]`` per-position sender means (mean ablation).
    """

    per_span = False
    """Whether the gates have a span axis (`ctlens.learning.span_gates.SpanGatedForward`)."""

    def __init__(
        self,
        model: Any,
        graph: Graph,
        ablation: Ablation,
        means: Float[torch.Tensor, "n_senders seq d_model"] | None = None,
    ) -> None:
        if (means is None) == (ablation is Ablation.MEAN):
            raise ValueError("GatedForward takes means exactly when the ablation is 'mean'")
        if graph.positional and not self.per_span:
            raise ValueError(
                f"GatedForward gates each edge at every position; {graph!r} is positional: "
                "use ctlens.learning.span_gates.SpanGatedForward (a gate per edge and span)"
            )
        if self.per_span and not graph.positional:
            raise ValueError(
                f"{type(self).__name__} gates (edge, span) pairs; {graph!r} has no spans: use "
                "GatedForward, or a graph with spans (Graph.from_model(model, spans=data))"
            )
        super().__init__(model, graph)
        self.ablation = ablation
        self.d_model = int(model.cfg.d_model)
        self._means = means
        self._ref: torch.Tensor | None = None  # corrupt: [n_senders, batch, pos, d_model]
        self._gates: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None  # this forward's a^ref - a (detached)
        self._parts: list[tuple[int, int, torch.Tensor]] = []  # (first row, end row, live)

    # -------------------------------------------------------------- controls

    def set_gates(
        self, gates: Float[torch.Tensor, "n_senders n_receivers *spans"] | None
    ) -> None:
        """Gate values for the next forwards (``None``: every edge kept); may require grad.
        Shape `Graph.dense_shape`: a span axis last on a positional graph."""
        expected = self.graph.dense_shape
        if gates is not None and tuple(gates.shape) != expected:
            raise ValueError(f"gates have shape {tuple(gates.shape)}, expected {expected}")
        self._gates = gates

    def use_reference(self, ref: Float[torch.Tensor, "n_senders batch pos d_model"]) -> None:
        """Corrupt ablation: the reference sender outputs of the next forwards' batch."""
        if self.ablation is not Ablation.CORRUPT:
            raise ValueError(f"use_reference is for corrupt ablation, not {self.ablation.value!r}")
        self._ref = ref

    def record_reference(
        self, tokens: torch.Tensor
    ) -> Float[torch.Tensor, "n_senders batch pos d_model"]:
        """Every sender's output on ``tokens`` (one no-grad, eval-mode, ungated forward)."""
        b, p = tokens.shape
        param = next(self.model.parameters())
        buffer = torch.zeros(
            self.graph.n_senders, b, p, self.d_model, device=param.device, dtype=param.dtype
        )

        def record(rows: slice, act: torch.Tensor) -> None:
            buffer[rows] += flat(act.detach()).permute(2, 0, 1, 3).to(buffer.dtype)

        hooks = sender_hooks(self.model, self.graph, record)
        with torch.no_grad(), eval_mode(self.model), self.paused():
            run_to_final_residual(self.model, tokens.to(param.device), hooks)
        return buffer

    def residual(self, tokens: torch.Tensor) -> Float[torch.Tensor, "batch pos d_model"]:
        """The gated model's final residual stream on ``tokens`` (hooks must be installed)."""
        return run_to_final_residual(self.model, tokens, [])

    def logits(self, residual: Float[torch.Tensor, "*rows d_model"]) -> torch.Tensor:
        """Logits from final-residual vectors (final norm and unembedding; the norm's input
        hook is the logits receiver, which must not gate these vectors a second time)."""
        with self.paused():
            return final_logits(self.model, residual)

    # -------------------------------------------------------------- hooks

    def _reference_rows(self, rows: slice, p: int) -> torch.Tensor | None:
        """``a^ref`` of senders ``rows`` as ``[n, (batch), pos, d]`` (None for zero)."""
        if self.ablation is Ablation.CORRUPT:
            if self._ref is None:
                raise RuntimeError("corrupt ablation: call use_reference(...) before the forward")
            return self._ref[rows, :, :p]
        if self.ablation is Ablation.MEAN:
            assert self._means is not None
            return self._means[rows, None, :p]
        return None

    def _on_sender(self, rows: slice, act: torch.Tensor) -> None:
        if self._paused or self._gates is None:
            return
        b, p = act.shape[:2]
        if rows.start == 0 and self._new_forward:
            self._new_forward = False
            self._start_forward(act, b, p)
            first_call = True
        else:
            first_call = False
        buffer = self._buffer
        assert buffer is not None
        with torch.no_grad():
            live = flat(act).permute(2, 0, 1, 3).to(buffer.dtype)
            if rows.start == 0 and not first_call:
                buffer[0] -= self._cells(live)[0]  # the position embedding joins the tokens'
            else:
                ref = self._reference_rows(rows, p)
                buffer[rows] = self._cells(-live if ref is None else ref.to(buffer.dtype) - live)
        if act.requires_grad:
            self._parts.append((rows.start, rows.stop, act))

    def _start_forward(self, act: torch.Tensor, b: int, p: int) -> None:
        if self._ref is not None and tuple(self._ref.shape[1:3]) != (b, p):
            raise RuntimeError(
                f"the corrupt reference is for [batch, seq] = {list(self._ref.shape[1:3])} "
                f"but this forward has {[b, p]}; call use_reference with this batch's"
            )
        if self._means is not None and p > self._means.shape[1]:
            raise RuntimeError(
                f"the mean reference covers {self._means.shape[1]} positions, this forward {p}"
            )
        self._parts = []
        # a new buffer per forward: the previous forward's backward may still read the old one
        self._buffer = torch.empty(
            (self.graph.n_senders, *self._cell_shape(b, p), self.d_model),
            device=act.device, dtype=act.dtype,
        )

    def _cell_shape(self, b: int, p: int) -> tuple[int, ...]:
        """The buffer's cell axes for a ``[b, p]`` forward (span gates sort them by span)."""
        return (b, p)

    def _cells(self, rows: Float[torch.Tensor, "m batch pos d_model"]) -> torch.Tensor:
        """Sender rows as the buffer holds them (span gates: their cells sorted by span)."""
        return rows

    def _on_receiver(
        self, columns: slice, n_up: int, x: torch.Tensor
    ) -> torch.Tensor | GroupedInput:
        if self._paused or self._gates is None:
            return x
        assert self._buffer is not None
        b, p = x.shape[:2]
        parts = [part for part in self._parts if part[0] < n_up]
        delta = self._gated_sum(columns, n_up, parts, b, p, x.dtype)  # [cols, b, p, d_model]
        if x.ndim == 4:  # q, k or v inputs, one per head
            return x + delta.permute(1, 2, 0, 3)
        if len(delta) == 1:  # an MLP or the logits
            return x + delta[0]
        # a grouped MLP reads one input; every neuron group gets its own gated copy
        index = torch.arange(len(delta), device=x.device)
        return GroupedInput(x, index, x[:, :, None] + delta.permute(1, 2, 0, 3))

    def _gated_sum(
        self,
        columns: slice,
        n_up: int,
        parts: list[tuple[int, int, torch.Tensor]],
        b: int,
        p: int,
        dtype: torch.dtype,
    ) -> Float[torch.Tensor, "cols batch pos d_model"]:
        """``(1 - G[:n_up, columns]).T @ buffer[:n_up]``, through `_GatedSum` under autograd."""
        assert self._gates is not None and self._buffer is not None
        coef_t = (1.0 - self._gates[:n_up, columns]).T.to(dtype)  # [cols, n_up]
        rows = self._buffer[:n_up].reshape(n_up, b * p * self.d_model)
        if torch.is_grad_enabled() and (coef_t.requires_grad or parts):
            ranges = [(start, stop) for start, stop, _ in parts]
            shape = (b, p, self.d_model)
            product = _GatedSum.apply(coef_t, rows, shape, ranges, *[a for *_, a in parts])
        else:
            product = coef_t @ rows
        return product.view(-1, b, p, self.d_model)


__all__ = ["BETA", "GAMMA", "ZETA", "GatedForward", "open_probability", "sample_gates"]
