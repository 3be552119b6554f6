"""Edge tables: `EdgeScores.to_pandas` and `Circuit.to_pandas` as one pandas DataFrame.

One row per valid edge, in graph order (sender-major), with the sender's and the receiver's
name and node attributes, the score and, for a circuit, whether the edge is in it. On a
positional graph there is one row per valid edge and span, with a ``span`` column. Node
attributes come from `NODE_COLUMNS` (``kind``, ``layer``, ``head``, ``mlp_group``, ``hook``),
each written once per end of the edge (``sender_kind``, ``receiver_kind``, ...): a new node
attribute is one more entry there. Given the MLP width ``d_mlp``, each end also gets the
half-open neuron slice ``neuron_start`` .. ``neuron_stop`` an MLP node covers (a group
``m{l}.n{j}`` of G: ``j*d_mlp/G`` .. ``(j+1)*d_mlp/G``; a whole MLP: ``0`` .. ``d_mlp``;
``<NA>`` for other nodes or without ``d_mlp``). pandas is an optional dependency
(``pip install "ctlens[pandas]"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float

from ctlens.bridge.mlp_groups import neuron_slice
from ctlens.graph import Graph
from ctlens.graph_spec import check_mlp_groups
from ctlens.types import Node, NodeKind

if TYPE_CHECKING:
    import pandas as pd

Reader = Callable[[Graph, Node, str], Any]

NODE_COLUMNS: dict[str, tuple[Reader, str]] = {
    "kind": (lambda graph, node, role: node.kind.value, "string"),
    "layer": (lambda graph, node, role: node.layer, "Int64"),
    "head": (
        lambda graph, node, role: None if node.kind is NodeKind.MLP else node.head,
        "Int64",
    ),
    "mlp_group": (
        lambda graph, node, role: node.head if node.kind is NodeKind.MLP else None,
        "Int64",
    ),
    "hook": (lambda graph, node, role: graph.hook_name(node, role).name, "string"),
}
"""Node attribute -> (how to read it from the graph, a `Node` and its role, ``"sender"`` or
``"receiver"``; its pandas dtype). Missing values are ``<NA>``: ``layer`` for ``input`` and
``logits``; ``head`` for MLPs, ``input`` and ``logits`` (for a grouped k/v receiver it is
the KV head index); ``mlp_group`` everywhere except the neuron-group nodes ``m{l}.n{j}`` of
a graph with ``mlp_groups > 1`` (there: j). ``hook`` is the TransformerLens hook the node
writes (sender) or reads (receiver), `Graph.hook_name`."""


def require_pandas() -> Any:
    """Import pandas, or raise an ``ImportError`` that says how to install it."""
    try:
        import pandas
    except ImportError:
        raise ImportError(
            "to_pandas needs pandas, an optional dependency of ctlens: "
            'pip install "ctlens[pandas]" (or pip install pandas)'
        ) from None
    return pandas


def edge_table(
    graph: Graph,
    scores: Float[torch.Tensor, "n_senders n_receivers *spans"] | None,
    mask: Bool[torch.Tensor, "n_senders n_receivers *spans"] | None = None,
    d_mlp: int | None = None,
) -> pd.DataFrame:
    """A DataFrame with one row per valid edge of ``graph`` (see the module docstring).

    ``score`` is NaN everywhere when ``scores`` is ``None``; the ``in_circuit`` column is
    present only when ``mask`` is given; the neuron columns are ``<NA>`` without ``d_mlp``.
    """
    pandas = require_pandas()
    if d_mlp is not None:
        check_mlp_groups(graph.spec.mlp_groups, d_mlp)
    cells = graph.dense_valid.nonzero(as_tuple=True)
    row_list, col_list = cells[0].tolist(), cells[1].tolist()
    columns: dict[str, Any] = {
        "sender": pandas.array([graph.senders[i] for i in row_list], dtype="string"),
        "receiver": pandas.array([graph.receivers[j] for j in col_list], dtype="string"),
    }
    for end, nodes, index in (
        ("sender", graph.sender_nodes, row_list),
        ("receiver", graph.receiver_nodes, col_list),
    ):
        for name, (read, dtype) in NODE_COLUMNS.items():
            per_node = [read(graph, node, end) for node in nodes]
            columns[f"{end}_{name}"] = pandas.array([per_node[k] for k in index], dtype=dtype)
        slices = [neurons(graph, node, d_mlp) for node in nodes]
        for name, bound in (("neuron_start", 0), ("neuron_stop", 1)):
            values = [None if slices[k] is None else slices[k][bound] for k in index]
            columns[f"{end}_{name}"] = pandas.array(values, dtype="Int64")
    if graph.positional:
        columns["span"] = pandas.array([graph.spans[k] for k in cells[2].tolist()], dtype="string")
    if scores is None:
        columns["score"] = torch.full((len(row_list),), float("nan")).numpy()
    else:
        columns["score"] = scores[cells].float().numpy()
    if mask is not None:
        columns["in_circuit"] = mask[cells].numpy()
    return pandas.DataFrame(columns)


def neurons(graph: Graph, node: Node, d_mlp: int | None) -> tuple[int, int] | None:
    """The half-open neuron range an MLP node covers in an MLP of width ``d_mlp``."""
    if node.kind is not NodeKind.MLP or d_mlp is None:
        return None
    part = neuron_slice(node.head or 0, graph.spec.mlp_groups, d_mlp)
    return part.start, part.stop
