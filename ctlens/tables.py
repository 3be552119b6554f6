"""Edge tables: `EdgeScores.to_pandas` and `Circuit.to_pandas` as one pandas DataFrame.

One row per valid edge, in graph order (sender-major), with the sender's and the receiver's
name and node attributes, the score and, for a circuit, whether the edge is in it. Node
attributes come from `NODE_COLUMNS` (``kind``, ``layer``, ``head``), each written once per
end of the edge (``sender_kind``, ``receiver_kind``, ...): a new node attribute is one more
entry there. pandas is an optional dependency (``pip install "ctlens[pandas]"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float

from ctlens.graph import Graph
from ctlens.types import Node

if TYPE_CHECKING:
    import pandas as pd

NODE_COLUMNS: dict[str, tuple[Callable[[Node], Any], str]] = {
    "kind": (lambda node: node.kind.value, "string"),
    "layer": (lambda node: node.layer, "Int64"),
    "head": (lambda node: node.head, "Int64"),
}
"""Node attribute -> (how to read it from a `Node`, its pandas dtype). ``layer`` and
``head`` are missing (``<NA>``) where a node has none (``input``, ``logits``, MLPs' head);
for a grouped k/v receiver ``head`` is the KV head (group) index."""


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
    scores: Float[torch.Tensor, "n_senders n_receivers"] | None,
    mask: Bool[torch.Tensor, "n_senders n_receivers"] | None = None,
) -> pd.DataFrame:
    """A DataFrame with one row per valid edge of ``graph`` (see the module docstring).

    ``score`` is NaN everywhere when ``scores`` is ``None``; the ``in_circuit`` column is
    present only when ``mask`` is given.
    """
    pandas = require_pandas()
    rows, cols = graph.valid.nonzero(as_tuple=True)
    row_list, col_list = rows.tolist(), cols.tolist()
    columns: dict[str, Any] = {
        "sender": pandas.array([graph.senders[i] for i in row_list], dtype="string"),
        "receiver": pandas.array([graph.receivers[j] for j in col_list], dtype="string"),
    }
    for end, nodes, index in (
        ("sender", graph.sender_nodes, row_list),
        ("receiver", graph.receiver_nodes, col_list),
    ):
        for name, (read, dtype) in NODE_COLUMNS.items():
            per_node = [read(node) for node in nodes]
            columns[f"{end}_{name}"] = pandas.array([per_node[k] for k in index], dtype=dtype)
    if scores is None:
        columns["score"] = torch.full((len(row_list),), float("nan")).numpy()
    else:
        columns["score"] = scores[rows, cols].float().numpy()
    if mask is not None:
        columns["in_circuit"] = mask[rows, cols].numpy()
    return pandas.DataFrame(columns)
