"""Random controls for ``mode="random"``: random circuits matched to what discovery selects.

``random_match`` says what the random circuit shares with the circuit discovery would
select at the same step (on the random run's own weights and batch):

- ``"edges"``: the number of edges (N random valid edges).
- ``"parameters"``: the number of trainable parameters. Nodes (a head's q, k, v or o slice,
  an MLP's input or output side) are drawn in random order and kept while they fit the
  budget, so the remainder ends smaller than the smallest node left (small nodes fill it).
- ``"composition"``: the same, per node kind (head senders, q, k, v receivers, MLP senders,
  MLP receivers), so the random circuit also moves the same mix of parameter kinds.

A node is unlocked alone through the parameter-free ends of the graph: a sender by its edge
to ``logits``, a receiver by its edge from ``input``; so the random circuit's trainable
parameters are exactly those of its drawn nodes.
"""

from __future__ import annotations

from typing import Any

import torch

from ctlens.circuit import Circuit
from ctlens.graph import Graph
from ctlens.types import NodeKind


def trainable_count(model: Any, circuit: Circuit, config: Any) -> int:
    """Real parameters `ctlens.restrict_gradients` lets move for ``circuit``."""
    from ctlens.masking import parameter_rules

    rules = parameter_rules(model, circuit, train_embeddings=config.train_embeddings,
                            train_unembedding=config.train_unembedding)
    return sum(rule.n_trainable for rule in rules)


class MatchedControl:
    """Draws random circuits matched on parameters (or per node kind) to a given circuit.

    Node sizes are measured once, one single-node circuit at a time, with the run's
    restriction options.
    """

    def __init__(self, model: Any, graph: Graph, config: Any) -> None:
        self.model = model
        self.graph = graph
        self.config = config
        self.nodes: list[tuple[str, int, str]] = []  # (role, index, kind)
        for i, node in enumerate(graph.sender_nodes):
            if node.kind is not NodeKind.INPUT:
                self.nodes.append(("sender", i, f"sender:{node.kind.value}"))
        for j, node in enumerate(graph.receiver_nodes):
            if node.kind is not NodeKind.LOGITS:
                self.nodes.append(("receiver", j, f"receiver:{node.kind.value}"))
        self.sizes = [trainable_count(model, self._circuit([n]), config) for n in self.nodes]

    def _circuit(self, nodes: list[tuple[str, int, str]]) -> Circuit:
        mask = torch.zeros(self.graph.n_senders, self.graph.n_receivers, dtype=torch.bool)
        for role, index, _ in nodes:
            if role == "sender":
                mask[index, self.graph.n_receivers - 1] = True
            else:
                mask[0, index] = True
        return Circuit(self.graph, mask, None, {})

    def budgets(self, target: Circuit, by_kind: bool) -> dict[str, int]:
        """Parameters ``target`` unlocks: in total, or per node kind (additive per node)."""
        if not by_kind:
            return {"all": trainable_count(self.model, target, self.config)}
        sends, reads = target.mask.any(1), target.mask.any(0)
        budgets: dict[str, int] = {}
        for (role, index, kind), size in zip(self.nodes, self.sizes, strict=True):
            used = sends[index] if role == "sender" else reads[index]
            budgets[kind] = budgets.get(kind, 0) + (size if bool(used) else 0)
        return budgets

    def draw(self, budgets: dict[str, int], generator: torch.Generator) -> Circuit:
        """A random circuit whose nodes fill each budget (``"all"``: any kind)."""
        order = torch.randperm(len(self.nodes), generator=generator).tolist()
        left = dict(budgets)
        chosen: list[tuple[str, int, str]] = []
        for i in order:
            key = "all" if "all" in left else self.nodes[i][2]
            if 0 < self.sizes[i] <= left.get(key, 0):
                chosen.append(self.nodes[i])
                left[key] -= self.sizes[i]
        return self._circuit(chosen)
