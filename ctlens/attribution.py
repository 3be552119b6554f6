"""Edge attribution: score every edge of the graph for a task.

For an edge s -> r the score is (DESIGN.md, the sign convention of EAP-IG and MIB)

    score(s -> r) = mean over examples of  sum over positions of  (a_s^ref - a_s^clean) . dM/dx_r

a first-order estimate of M(with that edge ablated) - M(clean), where a_s is the sender's
output, x_r the receiver's input and M the task metric. Rank edges by |score|.

Methods:

- ``eap``: per batch, one reference forward (no grad) records a_s^ref, one clean forward
  records a_s^clean and one backward gives every dM/dx_r. Sender outputs land in one
  ``[n_senders, batch, pos, d_model]`` buffer; when a receiver's gradient arrives, a single
  matrix product with the prefix of senders it may read fills its column(s) of the score
  matrix. Parameters are frozen during the backward, so only activation gradients are
  computed. No Python loop over examples, positions or edges.
- ``eap-ig``: integrated gradients on the input embedding. The gradients are averaged over
  ``steps`` inputs interpolated between the reference and the clean input
  (alpha = 1/steps, 2/steps, ..., 1), then dotted with the same activation differences.
- ``exact``: really patches every edge, one forward per edge (batched over senders): the
  true M(edge ablated) - M(clean). Slow; for validating the others on small graphs.

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
from typing import Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from ctlens.bridge.hooks import (
    SenderCallback,
    eval_mode,
    final_logits,
    flat,
    frozen_parameters,
    model_device,
    receiver_hooks,
    run_to_final_residual,
    sender_hooks,
    supports_truncated_forward,
)
from ctlens.bridge.names import HookLayout
from ctlens.data import MetricError, TaskData
from ctlens.graph import Graph
from ctlens.memory import AttributionFit, default_queue, fit_attribution
from ctlens.reference import Reference, check_graph, mean_activations, resolve_reference
from ctlens.scores import EdgeScores, check_finite_scores
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
    graph = check_graph(model, graph)
    data.check_vocab(model.cfg.d_vocab)
    data.check_context(getattr(model.cfg, "n_ctx", None))
    device = model_device(model)
    start = time.perf_counter()

    # the budget is checked before any pass or allocation
    fit = fit_attribution(model, graph, data.clean.shape[1], len(data), batch_size, max_memory)
    with eval_mode(model), frozen_parameters(model):
        corrupt, means = resolve_reference(model, graph, data, ablation, reference, batch_size)
        scores = torch.zeros(graph.n_senders, graph.n_receivers, device=device)
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
    buffers, ref_logits = _reference_activations(
        model, graph, run, ref_tokens, means, fit.buffer_dtype, groups
    )
    if method is Method.EXACT:
        _exact_batch(
            model, graph, run, buffers[0], group.start, ref_logits, scores, totals, n_total
        )
    else:
        kernel = EapKernel(
            graph, buffers[0], scores, passes=steps if method is Method.EAP_IG else 1,
            chunk=fit.chunk, queue=fit.receivers, first=group.start,
        )
        _gradient_batch(model, graph, run, kernel, buffers[-1], ref_logits, totals, n_total)


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
) -> tuple[list[Float[torch.Tensor, "group batch pos d_model"]], torch.Tensor | None]:
    """``a^ref`` for the senders of each of ``groups`` (one no-grad forward for all of them
    under corrupt ablation).

    Returns one buffer per group (in ``dtype``) and, under corrupt ablation, the reference
    run's logits.
    """
    b, p = run.batch.clean.shape
    buffers = [
        torch.zeros((len(g), b, p, model.cfg.d_model), device=run.batch.device, dtype=dtype)
        for g in groups
    ]
    ref_logits = None
    if ref_tokens is not None:
        pairs = zip(buffers, groups, strict=True)
        writers = [_writer(buffer, +1.0, g.start) for buffer, g in pairs]

        def write(rows: slice, act: torch.Tensor) -> None:
            for writer in writers:
                writer(rows, act)

        with torch.no_grad():
            ref_logits = run(ref_tokens, sender_hooks(model, graph, write))
    elif means is not None:
        for buffer, g in zip(buffers, groups, strict=True):
            buffer += means[g.start : g.stop, None, :p]
    return buffers, ref_logits


def _writer(buffer: torch.Tensor, sign: float, first: int = 0) -> SenderCallback:
    """A sender callback that adds ``sign * activation`` (detached) into ``buffer``, whose
    row 0 is sender ``first``; senders outside its rows are skipped."""
    stop = first + buffer.shape[0]

    def write(rows: slice, act: torch.Tensor) -> None:
        lo, hi = max(rows.start, first), min(rows.stop, stop)
        if lo >= hi:
            return
        act = flat(act.detach())
        if hi - lo != rows.stop - rows.start:
            act = act[:, :, lo - rows.start : hi - rows.start]
        buffer[lo - first : hi - first] += sign * act.float().permute(2, 0, 1, 3)

    return write


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


class EapKernel:
    """The one EAP kernel: ``scores[s, r] += sum over batch and positions of delta_s . dL/dx_r``.

    Shared by `attribute` (methods ``eap`` and ``eap-ig``) and the tuner's ``"batch"``
    discovery (`ctlens.tuning.discovery`), so both compute edge scores the same way and
    attribution's oracle tests cover the tuner's default path too.

    ``delta`` is a ``[rows, batch, pos, d_model]`` buffer of the activations of senders
    ``first .. first + rows`` (all of them unless the senders are chunked): the
    hooks of :meth:`sender_hooks` add ``sign * a_s`` into it during a forward pass, and the
    caller completes it to ``a_s^ref - a_s^clean`` before the backward (`attribute` fills
    ``a^ref`` first and subtracts the clean run; batch discovery records ``-a^clean`` and
    adds the batch means afterwards). The hooks of :meth:`receiver_hooks` register, on each
    receiver group's input, a gradient hook that multiplies the prefix of senders the
    receiver may read with that gradient (queued, several receiver groups per matrix
    product: :meth:`flush`) and adds ``sign * product / passes`` into ``scores``: the scores
    of every backward pass through those inputs accumulate, until :meth:`close` flushes and
    removes the hooks. Receivers that read none of the buffer's senders get no hook.

    Args:
        graph: the model's graph.
        delta: the activation buffer described above (read at backward time).
        scores: ``[n_senders, n_receivers]`` fp32 accumulator.
        passes: backward passes averaged (``eap-ig``'s steps; 1 for plain EAP).
        sign: ``-1`` when the differentiated quantity is minus the metric (a loss).
        chunk: for a low-precision ``delta`` (`ctlens.memory`): sender rows upcast to fp32
            per product; None: the whole prefix at once.
        queue: receiver columns queued before a product (receiver chunks; 1: each hook
            scored at once). None: `ctlens.memory.default_queue` - a quarter of a large fp32
            buffer's rows; on small buffers, or low-precision ones, 1.
        first: the sender index of ``delta``'s first row (sender chunks; 0: all senders).
    """

    def __init__(
        self,
        graph: Graph,
        delta: Float[torch.Tensor, "rows batch pos d_model"],
        scores: Float[torch.Tensor, "n_senders n_receivers"],
        passes: int = 1,
        sign: float = 1.0,
        chunk: int | None = None,
        queue: int | None = None,
        first: int = 0,
    ) -> None:
        rows = delta.shape[0]
        if not 0 <= first <= first + rows <= graph.n_senders:
            raise ValueError(
                f"the buffer's senders {first}..{first + rows} are not within the graph's "
                f"{graph.n_senders}"
            )
        self.graph = graph
        self.chunk = chunk
        self.delta = delta
        self.first = first
        self.scores = scores
        self.passes = passes
        self.sign = sign
        self.inputs: list[torch.Tensor] = []
        self._flat = delta.view(rows, -1)
        self._handles: list[Any] = []
        self._pending: list[tuple[slice, int, torch.Tensor]] = []
        self._pending_width = 0
        self._capacity = default_queue(rows, chunk) if queue is None else max(1, queue)

    def sender_hooks(self, model: Any, sign: float) -> list[tuple[str, Any]]:
        """Forward hooks adding ``sign * a_s`` (detached) of the buffer's senders into ``delta``."""
        return sender_hooks(model, self.graph, _writer(self.delta, sign, self.first))

    def receiver_hooks(self, model: Any) -> list[tuple[str, Any]]:
        """Forward hooks that make every receiver group's input score its edges on backward.

        An input that does not require grad (frozen parameters, no grad-carrying leaf) is
        replaced by a detached leaf that does; the inputs are kept in ``self.inputs`` for
        ``torch.autograd.grad``.
        """

        def on_receiver(columns: slice, n_up: int, x: torch.Tensor) -> torch.Tensor:
            if n_up <= self.first:  # reads none of this buffer's senders
                return x
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            self.inputs.append(x)
            self._handles.append(x.register_hook(self._accumulate(columns, n_up)))
            return x

        return receiver_hooks(model, self.graph, on_receiver)

    def _accumulate(self, columns: slice, n_up: int) -> Any:
        def accumulate(grad: torch.Tensor) -> None:
            width = columns.stop - columns.start
            g = flat(grad).float().permute(2, 0, 1, 3).reshape(width, -1)
            self._pending.append((columns, n_up, g))
            self._pending_width += width
            if self._pending_width >= self._capacity:
                self.flush()

        return accumulate

    def flush(self) -> None:
        """Score the queued receiver gradients with one matrix product.

        Each product reads the whole upstream prefix of the sender buffer, so gradients are
        queued until they fill a quarter of the buffer's rows and then multiplied with the
        longest prefix among them (gradients arrive latest layer first). With many senders
        (neuron-group graphs) the buffer is read a few times per backward instead of once
        per receiver hook. `close` flushes too.
        """
        if not self._pending:
            return
        first, rows = self.first, self._flat.shape[0]
        n_up = min(max(n for _, n, _ in self._pending) - first, rows)  # buffer rows read
        grads = [g for *_, g in self._pending]
        g = (grads[0] if len(grads) == 1 else torch.cat(grads)).T
        if self.chunk is None:
            product = self._flat[:n_up].float() @ g
        else:  # a low-precision buffer: upcast a few sender rows at a time
            product = torch.cat([
                self._flat[start : min(start + self.chunk, n_up)].float() @ g
                for start in range(0, n_up, self.chunk)
            ])
        scale = self.sign / self.passes
        offset = 0
        for columns, n, g in self._pending:
            width, n = g.shape[0], min(n - first, rows)
            self.scores[first : first + n, columns] += product[:n, offset : offset + width] * scale
            offset += width
        self._pending, self._pending_width = [], 0

    def close(self) -> None:
        """Score what is queued and remove the gradient hooks: later backward passes no
        longer add to ``scores``."""
        self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.inputs = []


def _gradient_batch(
    model: Any,
    graph: Graph,
    run: _Runner,
    kernel: EapKernel,
    origin: torch.Tensor,
    ref_logits: torch.Tensor | None,
    totals: dict[str, float],
    n_total: int,
) -> None:
    """Accumulate ``delta . mean_alpha(dM/dx_r)`` into the kernel's scores (EAP when its
    ``passes`` == 1; else EAP-IG with that many steps).

    ``kernel.delta`` holds ``a^ref`` on entry. The first pass is the clean input (alpha = 1):
    its sender hooks subtract ``a^clean`` so that ``delta`` is ``a^ref - a^clean`` by the
    time the backward reads it, and its logits serve as the reference distribution for ``kl``.
    The input leaf is shifted by ``(1 - alpha) * origin[0]``, the input sender's row:
    ``origin`` is the kernel's buffer, or for a later sender chunk a one-row buffer of its own.
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
                    base = base + shift * origin[0].to(base.dtype)
                return base.requires_grad_(True)

            hooks = [(layout.input_hooks[0], leaf), *kernel.receiver_hooks(model)]
            if clean_logits is None:
                hooks += kernel.sender_hooks(model, -1.0)
                if origin is not kernel.delta:
                    hooks += sender_hooks(model, graph, _writer(origin, -1.0))
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
    delta: torch.Tensor,
    first: int,
    ref_logits: torch.Tensor | None,
    scores: torch.Tensor,
    totals: dict[str, float],
    n_total: int,
    max_copies: int = 64,
) -> None:
    """Patch each edge for real: ``scores[s, r] += sum_examples (M(s->r ablated) - M(clean))``.

    ``delta`` holds ``a^ref`` on entry; a clean forward turns it into ``a^ref - a^clean``.
    Then, for one receiver column at a time, the batch is repeated once per chunk of
    senders, and copy c adds sender c's ``a^ref - a^clean`` to that receiver's input (a
    neuron group's own copy of the MLP input on a grouped graph). ``delta``'s row 0 is
    sender ``first`` (sender chunks): only its senders are patched.
    """
    batch = run.batch
    b = len(batch)
    clean_logits = run(batch.clean, sender_hooks(model, graph, _writer(delta, -1.0, first)))
    _record_metrics(run.metric_batch, clean_logits, ref_logits, totals)
    clean_metric = run.metric_batch.metric_values(clean_logits, clean_logits)
    for column in range(graph.n_receivers):
        n_up = min(graph.upstream[column], first + delta.shape[0])
        for chunk in _chunks(range(first, n_up), max(1, max_copies)):
            copies = len(chunk)
            patch = delta[chunk.start - first : chunk.stop - first]  # [copies, b, p, d]

            def patch_column(
                columns: slice,
                n_up: int,
                x: torch.Tensor,
                patch: torch.Tensor = patch,
                column: int = column,
            ) -> torch.Tensor:
                if not columns.start <= column < columns.stop:
                    return x
                x = x.clone()
                view = flat(x).view(patch.shape[0], b, *flat(x).shape[1:])
                view[:, :, :, column - columns.start] += patch.to(x.dtype)
                return x

            index = torch.arange(b).repeat(copies)
            hooks = receiver_hooks(model, graph, patch_column)
            logits = run(batch.clean[index], hooks, batch[index])
            repeated = run.metric_rows(index)
            values = repeated.metric_values(logits, clean_logits.repeat(copies, 1, 1))
            effect = (values.view(copies, b) - clean_metric[None]).sum(1)
            scores[chunk.start : chunk.stop, column] += effect / n_total


def _chunks(items: range, size: int) -> Iterable[range]:
    for start in range(items.start, items.stop, size):
        yield range(start, min(start + size, items.stop))


__all__ = ["EapKernel", "Reference", "attribute", "mean_activations", "resolve_reference"]
