"""Ablation references: what ``ablation=`` and ``reference=`` mean, read in one place.

`resolve_reference` is the one reader of ``ablation=`` / ``reference=`` for
`ctlens.attribute`, `ctlens.faithfulness` and `ctlens.edge_mask` (the rules are in its
docstring and in docs/masking.md); `mean_activations` computes the per-position sender means
that mean ablation replaces a sender with. Both are importable from `ctlens.attribution`,
where they lived first.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from ctlens.bridge.hooks import eval_mode, flat, model_device, run_to_final_residual, sender_hooks
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.types import Ablation

Reference = TaskData | torch.Tensor | None
"""What ``reference=`` may be: a `TaskData`, token ids or precomputed means (or None)."""


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
    graph = check_graph(model, graph)
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


def check_graph(model: Any, graph: Graph | None) -> Graph:
    """``graph``, or the model's one-group graph; refuses a graph of another model.

    Shared by `ctlens.attribute` and `mean_activations`, which take a ``graph=`` argument.
    """
    if graph is None:
        return Graph.from_model(model)
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a ctlens.Graph, got {type(graph).__name__}")
    if not graph.belongs_to(model):
        own = Graph.from_model(model, mlp_groups=graph.spec.mlp_groups, spans=graph.spans)
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


__all__ = ["Reference", "check_graph", "mean_activations", "resolve_reference"]
