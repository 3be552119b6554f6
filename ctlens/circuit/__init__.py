"""Circuits: a selected set of edges of a `Graph`, how to choose it, compare it and store it.

A `Circuit` is a bool ``mask`` ``[n_senders, n_receivers]`` over a model's edge graph (the
single source of truth: node and edge lists, networkx graphs and files are views of it),
optionally the dense edge ``scores`` it was selected from, and free-form ``metadata``.
Invalid edges (a receiver that reads before the sender writes) are never set.

Selection (`Circuit.from_scores`, `ctlens.circuit.selection`):

- ``top_n``: exactly the ``top_n`` valid edges with the largest |score| (the paper's rule;
  ties are broken by graph order: sender-major, then receiver).
- ``threshold``: every valid edge with |score| >= ``threshold``.
- ``greedy``: grow from ``logits`` backwards (as EAP-IG / MIB do): start with the edges into
  ``logits`` as candidates; repeatedly take the candidate with the largest |score|; when its
  sender joins, the edges into that sender's own inputs become candidates (a head's q, k and
  v receivers, an MLP's input). Stops at ``top_n`` edges. The result is always connected to
  ``logits``.

Pruning (``prune=True``, any method) removes edges that lie on no ``input -> logits`` path.
Paths are followed through components: a q, k or v receiver leads into the head(s) it feeds
(with grouped-query attention a k/v receiver feeds every head of its group), and an MLP's
receiver and sender are the same node. Without pruning, ``top_n`` is exactly the paper's
top-N.

Files (`Circuit.save` / `Circuit.load`) are versioned JSON, written atomically (a temporary
file in the same directory, then ``os.replace``), never pickle; `ctlens.circuit.file_format`
describes the document.

MIB / EAP-IG interoperability (`Circuit.to_mib_json`, `Circuit.from_mib_json`,
`mib_edge_names`, `mib_to_ctlens_edge`) is described in `ctlens.circuit.mib`: the mapping of
names is explicit and total in both directions.
"""

from ctlens.circuit.core import Circuit
from ctlens.circuit.file_format import FILE_FORMAT, SCHEMA_VERSION
from ctlens.circuit.mib import mib_edge_names, mib_to_ctlens_edge
from ctlens.circuit.selection import SELECTION_METHODS, prune_mask

__all__ = [
    "FILE_FORMAT",
    "SCHEMA_VERSION",
    "SELECTION_METHODS",
    "Circuit",
    "mib_edge_names",
    "mib_to_ctlens_edge",
    "prune_mask",
]
