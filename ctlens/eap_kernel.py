"""The EAP kernel: every edge score of a batch from sender differences and receiver gradients.

``scores[s, r] += sum over batch and positions of  delta_s . dM/dx_r``, with ``delta_s`` a
sender's activation difference (``a_s^ref - a_s^clean`` in `ctlens.attribute`) and
``dM/dx_r`` the gradient on a receiver's input. Shared by `ctlens.attribute` (``eap``,
``eap-ig``) and the tuner's ``"batch"`` discovery (`ctlens.tuning.discovery`).

Two parts:

- `SenderStore` holds the ``delta`` of senders ``first .. stop`` of one batch. Input, heads
  and one-group MLPs are ``d_model``-wide rows of one ``[rows, batch, pos, d_model]``
  tensor. A neuron-grouped MLP (``mlp_groups=G``) is kept as the hidden activation its
  groups are slices of, ``d_mlp`` per token instead of ``G * d_model`` (on GPT-2 small with
  48 groups, 12x less), and its group rows are expanded from it (``hidden[..., g] @
  W_out[g]``) only when a product needs them, a few layers at a time into one reused
  workspace.
- `EapKernel` registers a gradient hook on every receiver input. Gradients arrive latest
  layer first and are queued (several receiver hooks per product) and then multiplied
  with the senders the queued receivers may read (always a prefix of the sender list):
  one product with the plain rows, one per grouped layer with only the queued columns
  that may read that layer. A grouped MLP's receivers never get ``d_model``-wide input
  copies: their gradients are computed from the gradient on the MLP's pre-activations,
  a chunk of groups at a time, during the backward
  (`ctlens.bridge.hooks.group_gradient_hooks`).

The products cost what the valid edges cost: a group's score with a receiver is one dot
product over ``batch * pos * d_model``, as for any other sender; only the expansions (one
output projection per grouped layer and product) are added.

Positional scores (token spans, ``order``: a `ctlens.spans.SpanOrder`) do not sum over
positions: ``scores[s, r, k]`` sums over span ``k``'s cells only. At its first product the
store sorts its rows' cells by span (in place, a row at a time) and each product sorts the
queued gradients the same way, so span ``k`` is one contiguous block of both and its scores
one matrix product on views: the multiply-adds are those of position-free scores.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float

from ctlens.bridge.hooks import flat, group_gradient_hooks, receiver_hooks, sender_hooks
from ctlens.bridge.mlp_groups import group_rows, mlp_parts
from ctlens.graph import Graph
from ctlens.memory import WORKSPACE_ROWS, default_queue
from ctlens.memory import workspace_rows as largest_workspace
from ctlens.spans import SpanOrder

Scores = Float[torch.Tensor, "n_senders n_receivers *spans"]


@dataclass
class _HiddenLayer:
    """One grouped MLP layer in a `SenderStore`: its hidden activation and how to expand it."""

    layer: int
    rows: slice  # graph rows of its groups held by the store
    select: slice  # the same groups, counted within the layer
    hidden: Float[torch.Tensor, "batch pos d_mlp"]
    w_out: Float[torch.Tensor, "d_mlp d_model"]
    offset: Float[torch.Tensor, "groups pos d_model"] | None = None  # mean ablation


class SenderStore:
    """``delta_s`` of senders ``senders`` (default: all) for one batch (module docstring).

    Fill it through `hooks` (a forward adds ``sign * a_s``) and `add_means`; read it through
    `score` (products with receiver gradients), `expanded` (explicit rows) and `input_row`.

    Args:
        model: the bridge whose graph it is.
        graph: the graph (grouped or not).
        batch, pos: the batch's shape.
        dtype: the storage dtype (fp32, or the model's low precision under a budget).
        senders: the graph rows held (a sender chunk).
        workspace_rows: group rows expanded per product (whole layers, at least one).
        order: the batch's cells grouped by token span, for positional scores (module
            docstring); None: position-free scores.
    """

    def __init__(
        self, model: Any, graph: Graph, batch: int, pos: int, dtype: torch.dtype,
        senders: range | None = None, workspace_rows: int = WORKSPACE_ROWS,
        order: SpanOrder | None = None,
    ) -> None:
        senders = range(graph.n_senders) if senders is None else senders
        device = next(model.parameters()).device
        self.graph = graph
        self.first, self.stop = senders.start, senders.stop
        self._row = (batch, pos, int(model.cfg.d_model))
        self.layers: list[_HiddenLayer] = []
        grouped: set[int] = set()
        if graph.spec.mlp_groups > 1:
            for layer in range(graph.spec.n_layers):
                rows = graph.mlp_senders(layer)
                lo, hi = max(rows.start, self.first), min(rows.stop, self.stop)
                grouped.update(range(rows.start, rows.stop))
                if lo < hi:
                    hidden = torch.zeros(batch, pos, int(model.cfg.d_mlp), dtype=dtype,
                                         device=device)
                    self.layers.append(_HiddenLayer(
                        layer, slice(lo, hi), slice(lo - rows.start, hi - rows.start), hidden,
                        mlp_parts(model, layer).w_out,
                    ))
        self.row_list = [i for i in senders if i not in grouped]  # graph rows of ``plain``
        self.rows = torch.tensor(self.row_list, dtype=torch.long, device=device)
        self.contiguous = not grouped
        self._position = {row: k for k, row in enumerate(self.row_list)}
        self._by_layer = {h.layer: h for h in self.layers}
        self.plain = torch.zeros(len(self.row_list), *self._row, dtype=dtype, device=device)
        self._work: torch.Tensor | None = None  # expanded group rows, reused
        self._workspace_rows = max(graph.spec.mlp_groups, workspace_rows)
        # sized once for the largest batch of layers `score` expands (`ctlens.memory`)
        self._work_size = largest_workspace(
            [h.rows.stop - h.rows.start for h in self.layers], self._workspace_rows)
        self.order = order
        self._sorted = False  # the plain rows' cells are in ``order`` (after the first product)

    # ------------------------------------------------------------------ filling

    def hooks(self, model: Any, sign: float) -> list[tuple[str, Any]]:
        """Forward hooks adding ``sign * a_s`` (detached) of the held senders."""

        def plain(rows: slice, act: torch.Tensor) -> None:
            lo, hi = max(rows.start, self.first), min(rows.stop, self.stop)
            if lo >= hi or lo not in self._position:
                return
            if self._sorted:
                raise RuntimeError("a positional store is read-only once its cells are sorted")
            act = flat(act.detach())[:, :, lo - rows.start : hi - rows.start]
            at = self._position[lo]
            self.plain[at : at + hi - lo] += sign * act.float().permute(2, 0, 1, 3)

        def hidden(layer: int, post: torch.Tensor) -> None:
            if layer in self._by_layer:
                self._by_layer[layer].hidden += sign * post.detach().float()

        return sender_hooks(model, self.graph, plain, hidden=hidden)

    def add_means(self, means: Float[torch.Tensor, "n_senders seq d_model"]) -> None:
        """Add per-position means (mean ablation's ``a^ref``) to every held sender."""
        p = self._row[1]
        self.plain += means[self.rows, None, :p].to(self.plain.dtype)
        for h in self.layers:
            h.offset = means[h.rows, :p].float()

    def center(self, mask: torch.Tensor, world: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Turn ``-a_s`` into ``mean_s - a_s``, and 0 at padding (``mask``: ``[batch, pos]``
        real tokens): the mean is per position over the global batch (``world.sum_``).

        Returns the means: the plain rows' ``[rows, pos, d_model]`` and each grouped layer's
        hidden ``[pos, d_mlp]`` (`expanded_means` makes ``[n_senders, pos, d]`` of them)."""
        mask = mask.to(self.plain.dtype)
        count = mask.sum(0)
        self.plain *= mask[None, :, :, None]
        total = -self.plain.sum(1)
        hidden = []
        for h in self.layers:
            h.hidden *= mask[:, :, None]
            hidden.append(-h.hidden.sum(0))
        for tensor in (total, count, *hidden):
            world.sum_(tensor)
        scale = count.clamp(min=1)
        means = total / scale[None, :, None]
        hidden = [sums / scale[:, None] for sums in hidden]
        self.plain += means[:, None]
        self.plain *= mask[None, :, :, None]
        for h, mean in zip(self.layers, hidden, strict=True):
            h.hidden += mean[None]
            h.hidden *= mask[:, :, None]
        return means, hidden

    def expanded_means(
        self, means: torch.Tensor, hidden: list[torch.Tensor]
    ) -> Float[torch.Tensor, "n_senders pos d_model"]:
        """The ``[n_senders, pos, d_model]`` means of `center`'s result (all senders held)."""
        out = means.new_zeros(self.graph.n_senders, *means.shape[1:])
        out[self.rows] = means
        for h, mean in zip(self.layers, hidden, strict=True):
            groups = self.graph.spec.mlp_groups
            out[h.rows] = group_rows(mean[None], h.w_out, groups, h.select)[:, 0]
        return out

    # ------------------------------------------------------------------ reading

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the ``delta`` it stands for: ``[senders, batch, pos, d_model]``."""
        return (self.stop - self.first, *self._row)

    def input_row(self) -> Float[torch.Tensor, "batch pos d_model"]:
        """The ``input`` sender's row (the store must hold sender 0)."""
        if self.first != 0:
            raise ValueError("this store does not hold the input sender")
        if self._sorted:
            assert self.order is not None
            return self.order.unsort(self.plain[0])
        return self.plain[0]

    def expanded(self, lo: int, hi: int) -> Float[torch.Tensor, "rows batch pos d_model"]:
        """Held graph rows ``lo .. hi`` as ``d_model``-wide rows (group rows expanded)."""
        if self._sorted:
            raise RuntimeError("a positional store's rows are sorted by span once scored")
        out = torch.zeros(hi - lo, *self._row, device=self.plain.device)
        a, b = bisect.bisect_left(self.row_list, lo), bisect.bisect_left(self.row_list, hi)
        out[self.rows[a:b] - lo] = self.plain[a:b].float()
        for h in self.layers:
            a, b = max(lo, h.rows.start), min(hi, h.rows.stop)
            if a < b:
                out[a - lo : b - lo] = self._expand(h)[a - h.rows.start : b - h.rows.start]
        return out

    def _expand(
        self, h: _HiddenLayer, out: torch.Tensor | None = None
    ) -> Float[torch.Tensor, "groups batch pos d_model"]:
        rows = group_rows(h.hidden, h.w_out, self.graph.spec.mlp_groups, h.select, out)
        if h.offset is not None:
            rows += h.offset[:, None]
        return rows

    def score(
        self,
        g: Float[torch.Tensor, "n columns"] | Float[torch.Tensor, "columns cells d_model"],
        spans: list[tuple[slice, int, int]],
        scores: Scores,
        scale: float,
        chunk: int | None,
    ) -> None:
        """``scores[s, columns] += scale * delta_s . g[:, span]`` for each span
        ``(columns, n_upstream, offset)`` and each held sender ``s < n_upstream``.

        Grouped layers are expanded a few at a time into one reused workspace and multiplied
        with the columns that may read them (a prefix of the queue, which is ordered latest
        layer first). A positional store takes ``g`` as ``[columns, cells, d_model]`` in its
        ``order`` (`EapKernel.flush`) and adds ``[s, columns, spans]`` blocks."""
        n_max = max(n for _, n, _ in spans)
        k = bisect.bisect_left(self.row_list, n_max)
        if self.order is not None and not self._sorted:
            self.order.sort_rows_(self.plain)
            self._sorted = True
        if k:
            product = self._product(self.plain[:k], g, chunk)
            for columns, n, offset in spans:
                kk = bisect.bisect_left(self.row_list, n)
                block = product[:kk, offset : offset + columns.stop - columns.start] * scale
                if self.contiguous:
                    scores[self.first : self.first + kk, columns] += block
                else:
                    scores[:, columns].index_add_(0, self.rows[:kk], block)
        batch: list[_HiddenLayer] = []
        for h in self.layers:
            if h.rows.start >= n_max:
                break
            batch.append(h)
            if sum(x.rows.stop - x.rows.start for x in batch) >= self._workspace_rows:
                self._score_layers(batch, g, spans, scores, scale)
                batch = []
        if batch:
            self._score_layers(batch, g, spans, scores, scale)

    def _score_layers(
        self, batch: list[_HiddenLayer], g: torch.Tensor, spans: list[tuple[slice, int, int]],
        scores: Scores, scale: float,
    ) -> None:
        """Expand the layers ``batch`` into the workspace and multiply them with the queued
        columns that may read them."""
        sizes = [h.rows.stop - h.rows.start for h in batch]
        per_row = math.prod(self._row)
        if self._work is None:
            self._work = torch.empty(self._work_size, per_row, device=self.plain.device)
        start = 0
        for h, size in zip(batch, sizes, strict=True):
            self._expand(h, self._work[start : start + size])
            start += size
        end = max(o + c.stop - c.start for c, n, o in spans if n > batch[0].rows.start)
        work = self._work[:start].view(start, *self._row)
        if self.order is not None:
            self.order.sort_rows_(work)
            product = self.order.products(work.view(start, self._row[0] * self._row[1], -1),
                                          g[:end])
        else:
            product = work.view(start, -1) @ g[:, :end]
        start = 0
        for h, size in zip(batch, sizes, strict=True):
            for columns, n, offset in spans:
                if n > h.rows.start:
                    width = columns.stop - columns.start
                    block = product[start : start + size, offset : offset + width]
                    scores[h.rows, columns] += block * scale
            start += size


    def _product(
        self, rows: Float[torch.Tensor, "n batch pos d_model"], g: torch.Tensor, chunk: int | None
    ) -> torch.Tensor:
        """``rows . g`` in fp32: ``[n, columns]``, or ``[n, columns, spans]`` for a positional
        store (`SpanOrder.products`, which upcasts a span's block at a time); a
        low-precision position-free ``rows`` is upcast ``chunk`` rows at a time."""
        n = rows.shape[0]
        if self.order is not None:
            return self.order.products(rows.view(n, self._row[0] * self._row[1], -1), g)
        flat_rows = rows.view(n, -1)
        if chunk is None:
            return flat_rows.float() @ g
        return torch.cat([
            flat_rows[start : start + chunk].float() @ g for start in range(0, n, chunk)
        ])


class EapKernel:
    """The one EAP kernel: ``scores[s, r] += sum over batch and positions of delta_s . dL/dx_r``.

    ``store`` (a `SenderStore`) holds ``delta`` for its senders: the hooks of
    :meth:`sender_hooks` add ``sign * a_s`` into it during a forward pass, and the caller
    completes it to ``a_s^ref - a_s^clean`` before the backward (`attribute` fills ``a^ref``
    first and subtracts the clean run; batch discovery records ``-a^clean`` and centres it
    on the batch means, `SenderStore.center`). The hooks of :meth:`receiver_hooks` register
    a gradient hook on each receiver group's input (on a grouped graph's MLP receivers, on
    the MLP's pre-activations, module docstring); gradients are queued, several receiver
    groups per product (:meth:`flush`), and ``sign * product / passes`` is added into
    ``scores``: the scores of every backward pass through those inputs accumulate, until
    :meth:`close` flushes and removes the hooks. Receivers that read none of the store's
    senders get no hook.

    Args:
        graph: the model's graph.
        store: the sender differences described above (read at backward time).
        scores: ``[n_senders, n_receivers]`` fp32 accumulator (``[n_senders, n_receivers,
            n_spans]`` for a positional store).
        passes: backward passes averaged (``eap-ig``'s steps; 1 for plain EAP).
        sign: ``-1`` when the differentiated quantity is minus the metric (a loss).
        chunk: for a low-precision store (`ctlens.memory`): sender rows upcast to fp32 per
            product; None: the whole prefix at once.
        queue: receiver columns queued before a product (receiver chunks; 1: each hook
            scored at once). None: `ctlens.memory.default_queue` - a quarter of a large fp32
            buffer's rows; on small buffers, or low-precision ones, 1.
    """

    def __init__(
        self,
        graph: Graph,
        store: SenderStore,
        scores: Scores,
        passes: int = 1,
        sign: float = 1.0,
        chunk: int | None = None,
        queue: int | None = None,
    ) -> None:
        if store.graph != graph:
            raise ValueError(f"the store belongs to {store.graph!r}, not to {graph!r}")
        rows = store.stop - store.first
        self.graph = graph
        self.store = store
        self.first = store.first
        self.chunk = chunk
        self.scores = scores
        self.passes = passes
        self.sign = sign
        self.inputs: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._pending: list[tuple[slice, int, int]] = []  # (columns, n_upstream, queue row)
        self._pending_width = 0
        self._queue: torch.Tensor | None = None  # [rows, batch * pos * d_model] fp32, reused
        self._capacity = default_queue(rows, chunk) if queue is None else max(1, queue)
        groups = graph.spec.mlp_groups
        self._group_chunk = groups if self._capacity == 1 else min(groups, self._capacity)

    def sender_hooks(self, model: Any, sign: float) -> list[tuple[str, Any]]:
        """Forward hooks adding ``sign * a_s`` (detached) of the store's senders into it."""
        return self.store.hooks(model, sign)

    def receiver_hooks(self, model: Any) -> list[tuple[str, Any]]:
        """Forward hooks that make every receiver group's input score its edges on backward.

        An input that does not require grad (frozen parameters, no grad-carrying leaf) is
        replaced by a detached leaf that does; the watched tensors are kept in
        ``self.inputs`` for ``torch.autograd.grad``.
        """

        def on_receiver(columns: slice, n_up: int, x: torch.Tensor) -> torch.Tensor:
            if n_up <= self.first:  # reads none of this store's senders
                return x
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)

            def fill(out: torch.Tensor, grad: torch.Tensor) -> None:
                out.copy_(flat(grad).permute(2, 0, 1, 3))

            self._watch(x, lambda grad: self._push(columns, n_up, partial(fill, grad=grad)))
            return x

        def on_groups(columns: slice, n_up: int, fill: Any) -> None:
            if n_up > self.first:
                self._push(columns, n_up, fill)

        hooks = receiver_hooks(model, self.graph, on_receiver, groups=False)
        if self.graph.spec.mlp_groups > 1:
            hooks += group_gradient_hooks(model, self.graph, self._watch, on_groups,
                                          self._group_chunk)
        return hooks

    def _watch(self, tensor: torch.Tensor, hook: Any) -> None:
        self.inputs.append(tensor)
        self._handles.append(tensor.register_hook(hook))

    def _push(self, columns: slice, n_up: int, fill: Any) -> None:
        """Queue receiver gradients: ``fill(out)`` writes them into their rows of the queue."""
        width = columns.stop - columns.start
        if self._queue is None:
            rows = self._capacity - 1 + max(self.graph.spec.n_heads, self._group_chunk)
            self._queue = torch.empty(rows, math.prod(self.store.shape[1:]),
                                      device=self.scores.device)
        filled = self._pending_width
        fill(self._queue[filled : filled + width].view(width, *self.store.shape[1:]))
        self._pending.append((columns, n_up, filled))
        self._pending_width += width
        if self._pending_width >= self._capacity:
            self.flush()

    def flush(self) -> None:
        """Score the queued receiver gradients with one product per block of senders.

        Gradients are queued (in one reused buffer) until they fill the queue (a quarter of
        a large store's rows by default) and then multiplied with the longest prefix of
        senders among them (gradients arrive latest layer first), so a large graph's sender
        rows are read a few times per backward, not once per receiver hook. `close` flushes
        too.
        """
        if not self._pending:
            return
        assert self._queue is not None
        queued = self._queue[: self._pending_width]
        order = self.store.order
        g = queued.T if order is None else order.sorted_cells(
            queued.view(-1, *self.store.shape[1:]))
        spans, self._pending, self._pending_width = self._pending, [], 0
        with torch.no_grad():  # `close` flushes outside the backward, weights may need grad
            self.store.score(g, spans, self.scores, self.sign / self.passes, self.chunk)

    def close(self) -> None:
        """Score what is queued and remove the gradient hooks: later backward passes no
        longer add to ``scores``."""
        self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.inputs = []


__all__ = ["EapKernel", "SenderStore"]
