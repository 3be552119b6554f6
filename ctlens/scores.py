"""Dense edge scores over a `Graph`: what `ctlens.attribute` returns and later stages read.

``EdgeScores.scores`` (fp32 ``[n_senders, n_receivers]``, or ``[n_senders, n_receivers,
n_spans]`` on a positional graph; 0 where an edge is invalid) is the single source of
truth; the networkx view and the top-k list are computed from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from jaxtyping import Float

from ctlens.graph import Graph, coarsen_matrix, network_edges
from ctlens.scores_file import load_scores, save_scores
from ctlens.tables import edge_table

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class EdgeScores:
    """Dense edge scores over a `Graph`: the single source of truth for later stages.

    ``scores`` is fp32 ``[n_senders, n_receivers]`` (``[n_senders, n_receivers, n_spans]``
    on a positional graph, span names in `spans`), 0 where the edge is invalid. Summed over
    spans, positional scores are the position-free ones. ``metadata`` records how they were
    computed (method, ablation, examples, timings).
    """

    scores: Float[torch.Tensor, "n_senders n_receivers *spans"]
    graph: Graph
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = self.graph.dense_shape
        if tuple(self.scores.shape) != expected:
            spans = self.graph.spans
            hint = f" (senders, receivers, spans {list(spans)})" if spans else ""
            raise ValueError(
                f"scores have shape {tuple(self.scores.shape)}, expected {expected}{hint}"
            )
        self.scores = self.scores.detach().float().cpu() * self.graph.dense_valid

    @property
    def spans(self) -> tuple[str, ...]:
        """Span names of positional scores (the last axis of `scores`); empty otherwise."""
        return self.graph.spans

    def top(self, k: int) -> list[tuple[Any, ...]]:
        """The ``k`` edges with the largest |score|, as ``(sender, receiver, score)``; on a
        positional graph ``(sender, receiver, span, score)``: (edge, span) pairs."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > self.graph.n_edges:
            raise ValueError(
                f"k={k} is larger than the number of valid edges ({self.graph.n_edges}); "
                f"ask for at most {self.graph.n_edges}"
            )
        magnitude = self.scores.abs().masked_fill(~self.graph.dense_valid, -1.0)
        flat_index = magnitude.flatten().topk(k).indices
        cells = torch.stack(torch.unravel_index(flat_index, magnitude.shape), 1).tolist()
        return [(*self.graph.cell_name(c), float(self.scores[tuple(c)])) for c in cells]

    def node_scores(self) -> dict[str, float]:
        """Each sender's total effect: the sum of its outgoing edge scores (over all spans).

        Every sender feeds ``logits``, so to first order this equals ablating the node.
        """
        totals = self.scores.flatten(1).sum(1)
        return {name: float(v) for name, v in zip(self.graph.senders, totals, strict=True)}

    def coarsen(self) -> EdgeScores:
        """These scores on the plain graph: each MLP's group scores summed, and positional
        scores summed over their spans (which gives the position-free scores).

        For ``eap`` / ``eap-ig`` under ``corrupt`` or ``mean`` ablation this equals scoring
        the plain graph directly; under ``zero`` ablation the one-group scores also ablate
        b_out, and ``exact`` group or span scores only sum (docs/attribution.md).
        """
        spec = self.graph.spec
        if spec.mlp_groups == 1 and not spec.spans:
            return self
        graph, scores = coarsen_matrix(self.graph, self.scores)
        metadata = dict(self.metadata)
        if spec.mlp_groups != 1:
            metadata["coarsened_from_mlp_groups"] = spec.mlp_groups
        if spec.spans:
            metadata["coarsened_from_spans"] = list(spec.spans)
        return EdgeScores(scores, graph, metadata)

    def to_networkx(self) -> nx.DiGraph:
        """`Graph.to_networkx` with a ``score`` on every (non-internal) edge (an
        ``nx.MultiDiGraph`` with a ``span`` on each edge for positional scores)."""
        g = self.graph.to_networkx()
        values = self.scores
        for index, attrs in network_edges(self.graph, g):
            attrs["score"] = float(values[index])
        g.graph["metadata"] = dict(self.metadata)
        return g

    @classmethod
    def from_networkx(cls, g: nx.DiGraph) -> EdgeScores:
        """Inverse of `to_networkx`."""
        graph = Graph.from_networkx(g)
        scores = torch.zeros(graph.dense_shape)
        for index, attrs in network_edges(graph, g):
            scores[index] = float(attrs.get("score", 0.0))
        return cls(scores, graph, dict(g.graph.get("metadata", {})))

    def to_pandas(self, d_mlp: int | None = None) -> pd.DataFrame:
        """One row per valid edge: ``sender``, ``receiver``, ``sender_kind``,
        ``sender_layer``, ``sender_head``, ``sender_mlp_group``, ``sender_hook``,
        ``sender_neuron_start``, ``sender_neuron_stop``, the same for the receiver,
        ``span`` (positional scores only: one row per edge and span) and ``score``.

        The hook columns name the TransformerLens hook each node writes or reads
        (`Graph.hook_name`); pass the MLP width ``d_mlp`` (``model.cfg.d_mlp``) to get each
        MLP node's neuron slice, e.g. group ``m{l}.n{j}`` of G covers neurons
        ``[j*d_mlp/G, (j+1)*d_mlp/G)``. Needs pandas (``pip install "ctlens[pandas]"``);
        see `ctlens.tables`.
        """
        return edge_table(self.graph, self.scores, d_mlp=d_mlp)

    def save(self, path: str | Path) -> Path:
        """Write ``NAME.safetensors`` (the dense matrix) and ``NAME.json`` (graph spec,
        metadata, checksum) atomically; returns the matrix path.

        ``path`` may name either file or their common stem. Non-finite scores and metadata
        that is not plain JSON are refused. See `ctlens.scores_file`.
        """
        return save_scores(self.scores, self.graph, self.metadata, path)

    @classmethod
    def load(cls, path: str | Path, model: Any | None = None) -> EdgeScores:
        """Read a file pair written by `save` (``path``: either file or their stem).

        Args:
            path: ``NAME.safetensors``, ``NAME.json`` or ``NAME``.
            model: if given, the file's graph must be this model's (checked before the
                matrix is read); otherwise the declared graph must stay within
                `ctlens.file_limits.MAX_DENSE_CELLS`.
        """
        scores, graph, metadata = load_scores(path, model)
        return cls(scores, graph, metadata)

    def __repr__(self) -> str:
        method = self.metadata.get("method", "?")
        return f"EdgeScores({method}, {self.graph!r})"


def check_finite_scores(
    scores: Float[torch.Tensor, "n_senders n_receivers *spans"], graph: Graph, dtype: torch.dtype
) -> None:
    """Raise ``ValueError`` naming the first non-finite edge score and the likely cause.

    ``dtype`` is the model's parameter dtype: in float16 a gradient or an activation beyond
    about 65,504 overflows to inf, which is the usual cause there.
    """
    bad = ~torch.isfinite(scores) & graph.dense_valid.to(scores.device)
    if not bool(bad.any()):
        return
    edge = graph.cell_label(bad.nonzero()[0].tolist())
    count = int(bad.sum())
    if dtype == torch.float16:
        raise ValueError(
            f"float16 overflowed: {count} edge score(s) are not finite (first {edge}); "
            "float16 holds values up to about 65,504 only. Load the model with "
            "dtype='bfloat16' (same memory, float32's range) or 'float32'"
        )
    raise ValueError(
        f"{count} edge score(s) are not finite (first {edge}): the gradients of the metric "
        f"overflowed in {dtype}; check that the metric's scale is reasonable (e.g. not "
        "multiplied by a huge constant) and that the model's outputs are finite"
    )
