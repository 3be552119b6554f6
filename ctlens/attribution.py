"""Edge attribution: score every edge of the graph for a task.

For an edge s -> r the score is (DESIGN.md, the sign convention of EAP-IG and MIB)

    score(s -> r) = mean over examples of  sum over positions of  (a_s^ref - a_s^clean) . dM/dx_r

a first-order estimate of M(with that edge ablated) - M(clean), where a_s is the sender's
output, x_r the receiver's input and M the task metric. Rank edges by |score|.

Methods:

- ``eap``: per batch, one reference forward (no grad) records a_s^ref, one clean forward
  records a_s^clean and one backward gives every dM/dx_r. Sender outputs land in the EAP
  kernel's store (`ctlens.eap_kernel`: ``[senders, batch, pos, d_model]`` rows, a
  neuron-grouped MLP as its hidden activation); queued receiver gradients are multiplied
  with the prefix of senders they may read to fill their columns of the score matrix.
  Parameters are frozen during the backward, so only activation gradients are computed.
  No Python loop over examples, positions or edges.
- ``eap-ig``: integrated gradients on the input embedding. The gradients are averaged over
  ``steps`` inputs interpolated between the reference and the clean input
  (alpha = 1/steps, 2/steps, ..., 1), then dotted with the same activation differences.
- ``exact``: really patches every edge, one forward per edge (batched over senders): the
  true M(edge ablated) - M(clean). Slow; for validating the others on small graphs.

With ``spans=True`` (or a positional ``graph``) the scores are positional, ``[senders,
receivers, spans]`` over the data's token spans (`ctlens.spans`): the sum over positions
runs over one span's positions at a time, so summing over spans gives the position-free
scores (exactly for ``eap`` and ``eap-ig``), and ``exact`` patches each edge at one span's
positions only.

Ablations (what a_s^ref is): ``corrupt`` (the paired corrupted prompts, or the token tensor
given as ``reference``), ``mean`` (the per-position mean of each sender over the clean
prompts, padding excluded, or over the TaskData / tokens given as ``reference``, or a
precomputed ``[n_senders, seq, d_model]`` tensor from `mean_activations`) and ``zero``.

With a built-in metric every pass stops at the final residual stream and unembeds only the
metric positions (`ctlens.bridge.hooks.run_to_final_residual`); a custom metric callable gets the
full ``[batch, seq, vocab]`` logits. Buffers fit a memory budget (``max_memory``; see
`ctlens.memory`): fewer receiver gradients queued per product (receiver chunks), the sender
buffer in the model's dtype, smaller batches, and - when one example's buffer does not fit -
the senders split into groups that each get their own passes (sender chunks), while scores
stay fp32. The model's mode and ``requires_grad`` flags are restored on exit,
also on error. Checked against independent oracles in
tests/test_attribution.py; see docs/attribution.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from ctlens.bridge.hooks import (
    eval_mode,
    final_logits,
    flat,
    frozen_parameters,
    model_device,
    receiver_hooks,
    run_to_final_residual,
    supports_truncated_forward,
)
from ctlens.bridge.mlp_groups import GroupedInput
from ctlens.bridge.names import HookLayout
from ctlens.data import MetricError, TaskData
from ctlens.eap_kernel import EapKernel, SenderStore
from ctlens.graph import Graph
from ctlens.memory import AttributionFit, fit_attribution
from ctlens.reference import Reference, check_graph, mean_activations, resolve_reference
from ctlens.scores import EdgeScores, check_finite_scores
from ctlens.spans import SpanOrder, span_one_hot
from ctlens.types import Ablation, Method


def attribute(
    model: Any,
    data: TaskData,
    method: str | Method = "eap",
    ablation: str | Ablation = "corrupt",
    reference: Reference = None,
    batch_size: int | None = 32,
    steps: int = 5,
    progress: bool = True,
    graph: Graph | None = None,
    max_memory: int | str | None = None,
    spans: bool = False,
) -> EdgeScores:
    """Score every edge of ``model``'s graph on ``data``. See the module docstring.

    Args:
        model: a bridge from `ctlens.load_model`.
        data: the task examples and metric.
        method: ``"eap"``, ``"eap-ig"`` or ``"exact"``.
        ablation: ``"corrupt"``, ``"mean"`` or ``"zero"``.
        reference: overrides the default reference: corrupt token ids ``[batch, seq]`` for
            ``corrupt``; a `TaskData`, token ids or `mean_activations` output for ``mean``.
        batch_size: examples per forward pass (``None``: all at once).
        steps: integration steps for ``eap-ig``.
        progress: show a progress bar.
        graph: the graph to score, e.g. ``Graph.from_model(model, mlp_groups=48)`` for
            neuron-group MLP nodes (default: the model's graph with one node per MLP).
        max_memory: bytes (or a size such as ``"8GB"``) that attribution's buffers may use
            per pass; ``None``: half of what is free on the model's device. When the fp32
            sender buffer does not fit, fewer receiver gradients are queued, then the buffer
            is kept in the model's dtype (bf16/fp16) with fp32 products, then batches are
            split, then senders are scored in groups with a pass each (`ctlens.memory`).
            Scores stay fp32.
        spans: score per token span (positional scores over ``data.span_names``; ``data``
            needs spans). A positional ``graph`` does the same; its spans must be the data's.

    Returns:
        `EdgeScores` with fp32 scores and metadata (method, ablation, examples, timings,
        the clean metric and, under corrupt ablation, the corrupt metric).
    """
    method = Method.parse(method)
    ablation = Ablation.parse(ablation)
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a ctlens.TaskData, got {type(data).__name__}")
    if method is Method.EAP_IG and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer for eap-ig, got {steps!r}")
    graph = positional(check_graph(model, graph), data, spans)
    data.check_vocab(model.cfg.d_vocab)
    data.check_context(getattr(model.cfg, "n_ctx", None))
    device = model_device(model)
    start = time.perf_counter()

    # the budget is checked before any pass or allocation
    fit = fit_attribution(model, graph, data.clean.shape[1], len(data), batch_size, max_memory)
    with eval_mode(model), frozen_parameters(model):
        corrupt, means = resolve_reference(model, graph, data, ablation, reference, batch_size)
        scores = torch.zeros(graph.dense_shape, device=device)
        totals = {"clean": 0.0, "corrupt": 0.0}
        batches = list(data.batches(fit.batch_size))
        bar = tqdm(batches, desc=f"attribute ({method.value})", disable=not progress, unit="batch")
        offset = 0
        for batch in bar:
            rows = slice(offset, offset + len(batch))
            offset += len(batch)
            batch = batch.trimmed().to(device)
            ref_tokens = None
            if corrupt is not None:
                ref_tokens = corrupt[rows, : batch.clean.shape[1]].to(device)
            run = _Runner(model, batch)
            for group in fit.sender_groups(graph.n_senders):
                # the metric is recorded once per batch, by its first group's passes
                seen = totals if group.start == 0 else {"clean": 0.0, "corrupt": 0.0}
                try:
                    _score_batch(
                        model, graph, run, ref_tokens, means, method, steps, fit, group,
                        scores, seen, len(data),
                    )
                except MetricError as err:
                    raise err.shifted(rows.start) from None
    check_finite_scores(scores, graph, next(model.parameters()).dtype)

    metadata: dict[str, Any] = {
        "method": method.value,
        "ablation": ablation.value,
        "n_examples": len(data),
        "metric": data.metric
        if isinstance(data.metric, str)
        else getattr(data.metric, "__name__", "custom"),
        "metric_clean": totals["clean"] / len(data),
        "seconds": time.perf_counter() - start,
        "model": getattr(model.cfg, "model_name", None),
        "approximate": graph.spec.approximate,
    }
    if method is Method.EAP_IG:
        metadata["steps"] = steps
    if ablation is Ablation.CORRUPT:
        metadata["metric_corrupt"] = totals["corrupt"] / len(data)
    if fit.changed(batch_size):
        metadata["memory"] = fit.as_metadata()
    return EdgeScores(scores, graph, metadata)


def positional(graph: Graph, data: TaskData, spans: bool) -> Graph:
    """The graph to score: ``graph`` made positional over ``data``'s spans when ``spans``;
    a positional graph's spans checked against ``data``'s."""
    if spans and not graph.positional:
        if data.span_names is None:
            raise ValueError(
                "spans=True scores per token span, but the data has none: build it with "
                "TaskData.from_prompts(..., template=... or spans=...), use a built-in task, "
                "or data.with_position_spans()"
            )
        graph = Graph(replace(graph.spec, spans=data.span_names))
    if graph.positional:
        graph.check_spans(data.span_names, "the task data")
    return graph


# ------------------------------------------------------------------------------ passes


def _score_batch(
    model: Any,
    graph: Graph,
    run: _Runner,
    ref_tokens: torch.Tensor | None,
    means: torch.Tensor | None,
    method: Method,
    steps: int,
    fit: AttributionFit,
    group: range,
    scores: torch.Tensor,
    totals: dict[str, float],
    n_total: int,
) -> None:
    """Add one batch's share of the scores of senders ``group`` to ``scores`` (and of the
    metric to ``totals``)."""
    # eap-ig shifts the input by the input sender's difference: a later group keeps that row
    groups = [group, range(1)] if method is Method.EAP_IG and group.start else [group]
    order = None
    if graph.positional and method is not Method.EXACT:
        assert run.batch.spans is not None
        order = SpanOrder(run.batch.spans, graph.n_spans)
    stores, ref_logits = _reference_activations(
        model, graph, run, ref_tokens, means, fit.buffer_dtype, groups, order
    )
    if method is Method.EXACT:
        _exact_batch(model, graph, run, stores[0], ref_logits, scores, totals, n_total)
    else:
        kernel = EapKernel(
            graph, stores[0], scores, passes=steps if method is Method.EAP_IG else 1,
            chunk=fit.chunk, queue=fit.receivers,
        )
        _gradient_batch(model, run, kernel, stores[-1], ref_logits, totals, n_total)


class _Runner:
    """Forward passes for one batch, returning only the logits its metric reads.

    With a built-in metric the forward stops at the final residual stream and the logits
    are computed at the metric positions only (``[batch, P, vocab]``; the unembedding is
    the largest matrix product of a large-vocabulary model, and its backward the largest
    of the backward pass); ``self.metric_batch`` is the batch re-indexed to match. A custom
    metric callable sees the full ``[batch, seq, vocab]`` logits.
    """

    def __init__(self, model: Any, batch: TaskData) -> None:
        self.model = model
        self.batch = batch
        self.truncated = isinstance(batch.metric, str) and supports_truncated_forward(model)
        self.metric_batch = _at_positions(batch) if self.truncated else batch

    def __call__(
        self, tokens: torch.Tensor, hooks: list[tuple[str, Any]], batch: TaskData | None = None
    ) -> torch.Tensor:
        """Logits for ``tokens`` (rows of ``batch``, default: this runner's batch)."""
        batch = self.batch if batch is None else batch
        if not self.truncated:
            return self.model.run_with_hooks(tokens, fwd_hooks=hooks)
        residual = run_to_final_residual(self.model, tokens, hooks)
        rows = torch.arange(residual.shape[0], device=residual.device)[:, None]
        return final_logits(self.model, residual[rows, batch.positions_2d.to(residual.device)])

    def metric_rows(self, index: torch.Tensor) -> TaskData:
        """The metric batch for examples ``index`` of this batch."""
        return self.metric_batch[index]


def _at_positions(batch: TaskData) -> TaskData:
    """``batch`` re-indexed for logits taken at its metric positions (``[batch, P, vocab]``)."""
    n, n_pos = batch.positions_2d.shape
    positions = torch.arange(n_pos, device=batch.device).expand(n, n_pos)
    assert batch.positions is not None
    return TaskData(
        clean=torch.zeros(n, n_pos, dtype=torch.long, device=batch.device),
        correct=batch.correct,
        wrong=batch.wrong,
        positions=positions if batch.positions.ndim == 2 else positions[:, 0],
        metric=batch.metric,
    )


def _reference_activations(
    model: Any,
    graph: Graph,
    run: _Runner,
    ref_tokens: torch.Tensor | None,
    means: torch.Tensor | None,
    dtype: torch.dtype,
    groups: list[range],
    order: SpanOrder | None,
) -> tuple[list[SenderStore], torch.Tensor | None]:
    """``a^ref`` for the senders of each of ``groups`` (one no-grad forward for all of them
    under corrupt ablation).

    Returns one `SenderStore` per group (in ``dtype``; the first, which is scored,
    positional with ``order``) and, under corrupt ablation, the reference run's logits.
    """
    b, p = run.batch.clean.shape
    stores = [SenderStore(model, graph, b, p, dtype, g, order=order if k == 0 else None)
              for k, g in enumerate(groups)]
    ref_logits = None
    if ref_tokens is not None:
        hooks = [hook for store in stores for hook in store.hooks(model, +1.0)]
        with torch.no_grad():
            ref_logits = run(ref_tokens, hooks)
    elif means is not None:
        for store in stores:
            store.add_means(means)
    return stores, ref_logits


def _record_metrics(
    batch: TaskData,
    clean_logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
    totals: dict[str, float],
) -> None:
    with torch.no_grad():
        totals["clean"] += float(batch.metric_values(clean_logits, clean_logits).sum())
        if ref_logits is not None:
            totals["corrupt"] += float(batch.metric_values(ref_logits, clean_logits).sum())


def _gradient_batch(
    model: Any,
    run: _Runner,
    kernel: EapKernel,
    origin: SenderStore,
    ref_logits: torch.Tensor | None,
    totals: dict[str, float],
    n_total: int,
) -> None:
    """Accumulate ``delta . mean_alpha(dM/dx_r)`` into the kernel's scores (EAP when its
    ``passes`` == 1; else EAP-IG with that many steps).

    ``kernel.store`` holds ``a^ref`` on entry. The first pass is the clean input (alpha = 1):
    its sender hooks subtract ``a^clean`` so that ``delta`` is ``a^ref - a^clean`` by the
    time the backward reads it, and its logits serve as the reference distribution for ``kl``.
    The input leaf is shifted by ``(1 - alpha)`` times the input sender's row of ``origin``:
    the kernel's store, or for a later sender chunk a one-row store of its own.
    """
    steps = kernel.passes
    clean_logits: torch.Tensor | None = None
    batch = run.metric_batch
    layout = HookLayout.from_model(model)
    try:
        for step in range(steps, 0, -1):
            shift = 1.0 - step / steps

            def leaf(x: torch.Tensor, hook: Any, shift: float = shift) -> torch.Tensor:
                base = x.detach()
                if shift:
                    base = base + shift * origin.input_row().to(base.dtype)
                return base.requires_grad_(True)

            hooks = [(layout.input_hooks[0], leaf), *kernel.receiver_hooks(model)]
            if clean_logits is None:
                hooks += kernel.sender_hooks(model, -1.0)
                if origin is not kernel.store:
                    hooks += origin.hooks(model, -1.0)
            with torch.enable_grad():
                logits = run(run.batch.clean, hooks)
                if clean_logits is None:
                    clean_logits = logits.detach()
                    _record_metrics(batch, clean_logits, ref_logits, totals)
                values = batch.metric_values(logits, clean_logits)
                values.sum().div(n_total).backward()
            kernel.close()
            del logits, values
    finally:
        kernel.close()


@torch.no_grad()
def _exact_batch(
    model: Any,
    graph: Graph,
    run: _Runner,
    store: SenderStore,
    ref_logits: torch.Tensor | None,
    scores: torch.Tensor,
    totals: dict[str, float],
    n_total: int,
    max_copies: int = 64,
) -> None:
    """Patch each edge for real: ``scores[s, r] += sum_examples (M(s->r ablated) - M(clean))``.

    ``store`` holds ``a^ref`` on entry; a clean forward turns it into ``a^ref - a^clean``.
    Then, for one receiver column at a time, the batch is repeated once per chunk of
    senders, and copy c adds sender c's ``a^ref - a^clean`` to that receiver's input (on a
    grouped graph, an input of that neuron group's own, `GroupedInput`). Only the store's
    senders (a sender chunk) are patched. On a positional graph each sender gets one copy
    per span, patched at that span's positions only (``scores[s, r, k]``).
    """
    batch = run.batch
    b = len(batch)
    n_spans = max(1, graph.n_spans)
    where = None  # [spans, b, p, 1]: 1 at each span's positions
    if graph.positional:
        assert batch.spans is not None
        where = span_one_hot(batch.spans, n_spans).permute(2, 0, 1)[..., None]
    clean_logits = run(batch.clean, store.hooks(model, -1.0))
    _record_metrics(run.metric_batch, clean_logits, ref_logits, totals)
    clean_metric = run.metric_batch.metric_values(clean_logits, clean_logits)
    for column in range(graph.n_receivers):
        n_up = min(graph.upstream[column], store.stop)
        for chunk in _chunks(range(store.first, n_up), max(1, max_copies // n_spans)):
            copies = len(chunk) * n_spans
            patch = store.expanded(chunk.start, chunk.stop)  # [senders, b, p, d]
            if where is not None:  # copy (sender, span): the sender's patch at that span
                patch = (patch[:, None] * where[None].to(patch.dtype)).flatten(0, 1)
            hooks = receiver_hooks(model, graph, partial(_patch_column, column, patch))
            index = torch.arange(b).repeat(copies)
            logits = run(batch.clean[index], hooks, batch[index])
            repeated = run.metric_rows(index)
            values = repeated.metric_values(logits, clean_logits.repeat(copies, 1, 1))
            effect = (values.view(copies, b) - clean_metric[None]).sum(1) / n_total
            cells = scores[chunk.start : chunk.stop, column]
            cells += effect.view(len(chunk), n_spans) if where is not None else effect


def _patch_column(
    column: int, patch: torch.Tensor, columns: slice, n_up: int, x: torch.Tensor
) -> torch.Tensor | GroupedInput:
    """A receiver callback for `_exact_batch`: copy c of the repeated batch adds ``patch[c]``
    to receiver ``column``'s input."""
    if not columns.start <= column < columns.stop:
        return x
    copies = patch.shape[0]
    if x.ndim == 3 and columns.stop - columns.start > 1:  # one group of a grouped MLP
        own = x + patch.reshape(x.shape).to(x.dtype)
        index = torch.tensor([column - columns.start], device=x.device)
        return GroupedInput(x, index, own[:, :, None])
    x = x.clone()
    view = flat(x).view(copies, x.shape[0] // copies, *flat(x).shape[1:])
    view[:, :, :, column - columns.start] += patch.to(x.dtype)
    return x


def _chunks(items: range, size: int) -> Iterable[range]:
    for start in range(items.start, items.stop, size):
        yield range(start, min(start + size, items.stop))


__all__ = [
    "EapKernel", "Reference", "SenderStore", "attribute", "mean_activations",
    "resolve_reference",
]
