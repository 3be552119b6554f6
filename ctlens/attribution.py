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
metric positions (`ctlens.hooks.run_to_final_residual`); a custom metric callable gets the
full ``[batch, seq, vocab]`` logits. The model's mode and ``requires_grad`` flags are
restored on exit, also on error. Checked against independent oracles in
tests/test_attribution.py; see docs/attribution.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.hooks import (
    HookLayout,
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
from ctlens.scores import EdgeScores
from ctlens.types import Ablation, Method

Reference = TaskData | torch.Tensor | None


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
    graph = _check_graph(model, graph)
    data.check_vocab(model.cfg.d_vocab)
    device = model_device(model)
    start = time.perf_counter()

    with eval_mode(model), frozen_parameters(model):
        corrupt, means = resolve_reference(model, graph, data, ablation, reference, batch_size)
        scores = torch.zeros(graph.n_senders, graph.n_receivers, device=device)
        totals = {"clean": 0.0, "corrupt": 0.0}
        batches = list(data.batches(batch_size))
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
            delta, ref_logits = _reference_activations(model, graph, run, ref_tokens, means)
            if method is Method.EXACT:
                _exact_batch(model, graph, run, delta, ref_logits, scores, totals, len(data))
            else:
                n_steps = steps if method is Method.EAP_IG else 1
                _gradient_batch(
                    model, graph, run, delta, ref_logits, scores, totals, len(data), n_steps
                )
            del delta, ref_logits

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
    return EdgeScores(scores, graph, metadata)


# ------------------------------------------------------------------------------ references


@torch.no_grad()
def mean_activations(
    model: Any,
    reference: TaskData | torch.Tensor,
    batch_size: int | None = 32,
    graph: Graph | None = None,
) -> Float[torch.Tensor, "n_senders seq d_model"]:
    """Each sender's mean output per position over ``reference``, padding excluded.

    ``reference`` is a `TaskData` (its clean prompts and padding mask) or token ids
    ``[n, seq]`` (all real tokens). The result can be passed as ``reference=`` wherever
    ``ablation="mean"`` is used, so the means are computed once. ``graph`` selects the
    senders (default: the model's graph with one node per MLP).
    """
    graph = _check_graph(model, graph)
    device = model_device(model)
    if isinstance(reference, torch.Tensor):
        if reference.dtype.is_floating_point:
            raise TypeError("mean_activations takes token ids, not activations")
        reference = TaskData(
            clean=reference,
            metric="logprob",
            correct=torch.zeros(reference.shape[0], dtype=torch.long),
        )
    reference.check_vocab(model.cfg.d_vocab)
    seq = reference.clean.shape[1]
    total = torch.zeros(graph.n_senders, seq, model.cfg.d_model, device=device)
    count = torch.zeros(seq, device=device)
    with eval_mode(model):
        for batch in reference.batches(batch_size):
            batch = batch.trimmed().to(device)
            assert batch.attention_mask is not None
            p = batch.clean.shape[1]
            mask = batch.attention_mask.float()

            def record(rows: slice, act: torch.Tensor, p: int = p, mask: torch.Tensor = mask):
                summed = torch.einsum("bpnd,bp->npd", flat(act).float(), mask)
                total[rows, :p] += summed

            run_to_final_residual(model, batch.clean, sender_hooks(model, graph, record))
            count[:p] += mask.sum(0)
    return total / count.clamp(min=1)[None, :, None]


def resolve_reference(
    model: Any,
    graph: Graph,
    data: TaskData | None,
    ablation: Ablation,
    reference: Reference,
    batch_size: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Turn ``ablation`` + ``reference`` into what the passes need, checking both.

    The one reader of ``ablation=`` / ``reference=``, shared by `attribute`,
    `ctlens.faithfulness` and `ctlens.edge_mask`, so all three follow the same rules:

    - ``zero``: ``reference`` must be None.
    - ``corrupt``: ``reference`` is corrupt token ids; the default is ``data.corrupt``. With
      ``data`` they must have the clean prompts' shape. Without ``data`` (`edge_mask`, which
      sees no task) the default is "none yet": the caller records one per batch.
    - ``mean``: ``reference`` is a `TaskData` or token ids to average over (padding
      excluded) or precomputed `mean_activations`; the default is ``data``'s clean prompts.
      Without ``data`` there is no default, and the error says what to pass. The default
      over a single example is refused: the mean of one prompt is that prompt's own
      activations, so every ablation would be a no-op and every score 0.

    Returns ``(corrupt_tokens, means)``: the corrupt token ids (corrupt ablation), the
    per-position sender means ``[n_senders, seq, d_model]`` (mean ablation: fp32 when
    computed here, precomputed ones keep their dtype), or neither.
    """
    if ablation is Ablation.ZERO:
        if reference is not None:
            raise ValueError("zero ablation takes no reference; drop the reference argument")
        return None, None
    if ablation is Ablation.CORRUPT:
        return _corrupt_reference(model, data, reference), None
    if reference is None and data is None:
        raise ValueError(
            "mean ablation needs a reference here: there are no task prompts to average over "
            "by default, so pass reference=<TaskData or token ids to average over> or "
            "reference=ctlens.mean_activations(model, data)"
        )
    if isinstance(reference, torch.Tensor) and reference.dtype.is_floating_point:
        expected = (graph.n_senders, model.cfg.d_model)
        if reference.ndim != 3 or (reference.shape[0], reference.shape[2]) != expected:
            raise ValueError(
                f"precomputed means must be [n_senders={expected[0]}, seq, "
                f"d_model={expected[1]}] (from ctlens.mean_activations), got "
                f"{tuple(reference.shape)}"
            )
        means = reference.detach().to(model_device(model))
    else:
        source = data if reference is None else reference
        if not isinstance(source, (TaskData, torch.Tensor)):
            raise TypeError(
                "mean ablation needs reference=<TaskData>, token ids [n, seq] or precomputed "
                f"means from ctlens.mean_activations; got {type(source).__name__}"
            )
        if data is not None and _is_one_clean_prompt(source, data):
            raise ValueError(
                "mean ablation over one example: the mean of a single prompt is that "
                "prompt's own activations, so ablating to it changes nothing and every edge "
                "would score 0. Use more examples, pass reference=<other prompts to average "
                "over>, or use ablation='corrupt' or 'zero'"
            )
        means = mean_activations(model, source, batch_size, graph=graph)
    if data is not None and means.shape[1] < data.clean.shape[1]:
        raise ValueError(
            f"the mean reference covers {means.shape[1]} positions but the data has "
            f"{data.clean.shape[1]}; use reference prompts at least as long as the task's"
        )
    return None, means


def _check_graph(model: Any, graph: Graph | None) -> Graph:
    """``graph``, or the model's one-group graph; refuses a graph of another model."""
    if graph is None:
        return Graph.from_model(model)
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a ctlens.Graph, got {type(graph).__name__}")
    own = Graph.from_model(model, mlp_groups=graph.spec.mlp_groups)
    if own != graph:
        raise ValueError(f"graph {graph!r} does not belong to this model, whose graph is {own!r}")
    return graph


def _corrupt_reference(
    model: Any, data: TaskData | None, reference: Reference
) -> torch.Tensor | None:
    """The corrupt token ids that `resolve_reference` hands on (None: recorded later)."""
    tokens = reference if reference is not None else None if data is None else data.corrupt
    if tokens is None:
        if data is None:
            return None
        raise ValueError(
            "corrupt ablation needs corrupted prompts: build TaskData with corrupt=..., "
            "pass reference=<corrupt token ids>, or use ablation='mean' or 'zero'"
        )
    if isinstance(tokens, TaskData):
        raise TypeError(
            "corrupt ablation takes the corrupt token ids as reference (e.g. data.corrupt), "
            "not a TaskData"
        )
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point:
        raise TypeError("the corrupt reference must be token ids [batch, seq] (an integer tensor)")
    if data is not None and tokens.shape != data.clean.shape:
        raise ValueError(
            f"the corrupt reference must be token ids of shape {tuple(data.clean.shape)}, "
            "the same as the clean prompts"
        )
    if tokens.ndim != 2:
        raise ValueError(
            f"the corrupt reference must be token ids [batch, seq], got shape "
            f"{tuple(tokens.shape)}"
        )
    vocab = model.cfg.d_vocab
    if ((tokens < 0) | (tokens >= vocab)).any():
        raise ValueError(f"corrupt holds token ids outside the vocabulary of {vocab}")
    return tokens


def _is_one_clean_prompt(source: TaskData | torch.Tensor, data: TaskData) -> bool:
    """True when a mean over ``source`` would be the mean over ``data``'s single prompt."""
    tokens = source.clean if isinstance(source, TaskData) else source
    return (
        len(tokens) == 1
        and tokens.shape == data.clean.shape
        and torch.equal(tokens.cpu(), data.clean.cpu())
    )


# ------------------------------------------------------------------------------ passes


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
) -> tuple[Float[torch.Tensor, "n_senders batch pos d_model"], torch.Tensor | None]:
    """``a^ref`` for every sender (one no-grad forward under corrupt ablation).

    Returns the buffer and, under corrupt ablation, the reference run's logits.
    """
    b, p = run.batch.clean.shape
    buffer = torch.zeros(graph.n_senders, b, p, model.cfg.d_model, device=run.batch.device)
    ref_logits = None
    if ref_tokens is not None:
        with torch.no_grad():
            ref_logits = run(ref_tokens, sender_hooks(model, graph, _writer(buffer, +1.0)))
    elif means is not None:
        buffer += means[:, None, :p]
    return buffer, ref_logits


def _writer(buffer: torch.Tensor, sign: float) -> SenderCallback:
    """A sender callback that adds ``sign * activation`` (detached) into ``buffer``."""

    def write(rows: slice, act: torch.Tensor) -> None:
        buffer[rows] += sign * flat(act.detach()).float().permute(2, 0, 1, 3)

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

    ``delta`` is a ``[n_senders, batch, pos, d_model]`` buffer of sender activations: the
    hooks of :meth:`sender_hooks` add ``sign * a_s`` into it during a forward pass, and the
    caller completes it to ``a_s^ref - a_s^clean`` before the backward (`attribute` fills
    ``a^ref`` first and subtracts the clean run; batch discovery records ``-a^clean`` and
    adds the batch means afterwards). The hooks of :meth:`receiver_hooks` register, on each
    receiver group's input, a gradient hook that multiplies the prefix of senders the
    receiver may read with that gradient (queued, several receiver groups per matrix
    product: :meth:`flush`) and adds ``sign * product / passes`` into ``scores``: the scores
    of every backward pass through those inputs accumulate, until :meth:`close` flushes and
    removes the hooks.

    Args:
        graph: the model's graph.
        delta: the activation buffer described above (read at backward time).
        scores: ``[n_senders, n_receivers]`` fp32 accumulator.
        passes: backward passes averaged (``eap-ig``'s steps; 1 for plain EAP).
        sign: ``-1`` when the differentiated quantity is minus the metric (a loss).
    """

    def __init__(
        self,
        graph: Graph,
        delta: Float[torch.Tensor, "n_senders batch pos d_model"],
        scores: Float[torch.Tensor, "n_senders n_receivers"],
        passes: int = 1,
        sign: float = 1.0,
    ) -> None:
        self.graph = graph
        self.delta = delta
        self.scores = scores
        self.passes = passes
        self.sign = sign
        self.inputs: list[torch.Tensor] = []
        self._flat = delta.view(graph.n_senders, -1)
        self._handles: list[Any] = []
        self._pending: list[tuple[slice, int, torch.Tensor]] = []
        self._pending_width = 0
        self._capacity = max(16, graph.n_senders // 4)

    def sender_hooks(self, model: Any, sign: float) -> list[tuple[str, Any]]:
        """Forward hooks adding ``sign * a_s`` (detached) of every sender into ``delta``."""
        return sender_hooks(model, self.graph, _writer(self.delta, sign))

    def receiver_hooks(self, model: Any) -> list[tuple[str, Any]]:
        """Forward hooks that make every receiver group's input score its edges on backward.

        An input that does not require grad (frozen parameters, no grad-carrying leaf) is
        replaced by a detached leaf that does; the inputs are kept in ``self.inputs`` for
        ``torch.autograd.grad``.
        """

        def on_receiver(columns: slice, n_up: int, x: torch.Tensor) -> torch.Tensor:
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
        n_up = max(n for _, n, _ in self._pending)
        grads = [g for *_, g in self._pending]
        product = self._flat[:n_up] @ (grads[0] if len(grads) == 1 else torch.cat(grads)).T
        scale = self.sign / self.passes
        offset = 0
        for columns, n, g in self._pending:
            width = g.shape[0]
            self.scores[:n, columns] += product[:n, offset : offset + width] * scale
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
    delta: torch.Tensor,
    ref_logits: torch.Tensor | None,
    scores: torch.Tensor,
    totals: dict[str, float],
    n_total: int,
    steps: int,
) -> None:
    """Accumulate ``delta . mean_alpha(dM/dx_r)`` into ``scores`` (EAP when steps == 1).

    ``delta`` holds ``a^ref`` on entry. The first pass is the clean input (alpha = 1): its
    sender hooks subtract ``a^clean`` so that ``delta`` is ``a^ref - a^clean`` by the time
    the backward reads it, and its logits serve as the reference distribution for ``kl``.
    """
    kernel = EapKernel(graph, delta, scores, passes=steps)
    clean_logits: torch.Tensor | None = None
    batch = run.metric_batch
    layout = HookLayout.from_model(model)
    try:
        for step in range(steps, 0, -1):
            shift = 1.0 - step / steps

            def leaf(x: torch.Tensor, hook: Any, shift: float = shift) -> torch.Tensor:
                base = x.detach()
                if shift:
                    base = base + shift * delta[0].to(base.dtype)
                return base.requires_grad_(True)

            hooks = [(layout.input_hooks[0], leaf), *kernel.receiver_hooks(model)]
            if clean_logits is None:
                hooks += kernel.sender_hooks(model, -1.0)
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
    neuron group's own copy of the MLP input on a grouped graph).
    """
    batch = run.batch
    b = len(batch)
    clean_logits = run(batch.clean, sender_hooks(model, graph, _writer(delta, -1.0)))
    _record_metrics(run.metric_batch, clean_logits, ref_logits, totals)
    clean_metric = run.metric_batch.metric_values(clean_logits, clean_logits)
    for column in range(graph.n_receivers):
        n_up = graph.upstream[column]
        for chunk in _chunks(range(n_up), max(1, max_copies)):
            copies = len(chunk)
            patch = delta[chunk.start : chunk.stop]  # [copies, b, p, d]

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
