"""Random controls for ``mode="random"``: random circuits matched to what discovery selects.

``random_match`` says what the random circuit shares with the circuit discovery would
select at the same step (on the random run's own weights and batch):

- ``"edges"``: the number of edges (N random valid edges).
- ``"parameters"``: the number of trainable parameters. Nodes (a head's q, k, v or o slice,
  an MLP's input or output side) are drawn in random order and kept while they fit the
  budget.
- ``"composition"``: the same, per node kind (head senders, q, k, v receivers, MLP senders,
  MLP receivers), so the random circuit also moves the same mix of parameter kinds.

Counts are taken on the *union* of the parameters the nodes open, as
`ctlens.restrict_gradients` unlocks them: a layer's heads share its attention-output bias
b_O (and an MLP's neuron groups its b_out), which counts once however many of them are in.
The budget is the union count of the discovered circuit (per kind: of its nodes of that
kind); a node costs what it adds to the union drawn so far. Hence the bound, per budget:

    0 <= budget - matched < the smallest cost of a node not drawn

where ``matched`` is the drawn circuit's real trainable count and a node's cost is what it
would add to the drawn circuit now (a head whose layer's b_O is already in costs its W_O
slice alone). Nodes are offered in random order, and offered again until none fits, so the
bound holds by construction.

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

Piece = tuple[int, tuple[Any, ...]]
"""One slice a node opens: ``(id(parameter), the index, made hashable)``. Two nodes'
pieces are identical (a shared bias) or disjoint; `MatchedControl` checks it."""


def trainable_count(model: Any, circuit: Circuit, config: Any) -> int:
    """Real parameters `ctlens.restrict_gradients` lets move for ``circuit``."""
    from ctlens.masking import parameter_rules

    rules = parameter_rules(model, circuit, train_embeddings=config.train_embeddings,
                            train_unembedding=config.train_unembedding)
    return sum(rule.n_trainable for rule in rules)


def _index_key(index: tuple[Any, ...]) -> tuple[Any, ...]:
    """A hashable spelling of a rule's index (slices are unhashable before Python 3.12)."""
    return tuple((x.start, x.stop, x.step) if isinstance(x, slice) else repr(x) for x in index)


class MatchedControl:
    """Draws random circuits matched on parameters (or per node kind) to a given circuit.

    Each node's pieces (the slices it opens, with the run's restriction options) are read
    once from the parameter rules; union counts add the sizes of distinct pieces. The
    constructor checks that this equals `trainable_count` of the circuit of every node, so
    a rule that opened partly overlapping slices could not be counted wrong silently.
    """

    def __init__(self, model: Any, graph: Graph, config: Any) -> None:
        from ctlens.masking.rules import rule_openings

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
        self.piece_size: dict[Piece, int] = {}
        self.pieces: list[frozenset[Piece]] = []
        with torch.no_grad():
            for node in self.nodes:
                _, openings = rule_openings(model, self._circuit([node]),
                                            config.train_embeddings, config.train_unembedding)
                keys = set()
                for parameter, index in openings:
                    key = (id(parameter), _index_key(index))
                    self.piece_size[key] = parameter[index].numel()
                    keys.add(key)
                self.pieces.append(frozenset(keys))
        self.sizes = [self._union([i]) for i in range(len(self.nodes))]
        every = trainable_count(model, self._circuit(self.nodes), config)
        if sum(self.piece_size.values()) != every:
            raise ValueError(
                f"the parameter rules open overlapping slices that are not identical (pieces "
                f"sum to {sum(self.piece_size.values())}, the union is {every}); "
                "MatchedControl counts unions of identical or disjoint slices only"
            )

    def _circuit(self, nodes: list[tuple[str, int, str]]) -> Circuit:
        mask = torch.zeros(self.graph.n_senders, self.graph.n_receivers, dtype=torch.bool)
        for role, index, _ in nodes:
            if role == "sender":
                mask[index, self.graph.n_receivers - 1] = True
            else:
                mask[0, index] = True
        return Circuit(self.graph, mask, None, {})

    def _union(self, chosen: list[int]) -> int:
        """Parameters the nodes ``chosen`` (indices into `nodes`) open together."""
        pieces = set().union(*(self.pieces[i] for i in chosen))
        return sum(self.piece_size[p] for p in pieces)

    def node_indices(self, circuit: Circuit) -> list[int]:
        """Indices into `nodes` of the nodes ``circuit`` unlocks (sends or reads along an
        edge)."""
        sends, reads = circuit.mask.any(1), circuit.mask.any(0)
        return [i for i, (role, index, _) in enumerate(self.nodes)
                if bool(sends[index] if role == "sender" else reads[index])]

    def cost(self, node: int, drawn: set[Piece]) -> int:
        """What node ``node`` adds to the union of the pieces ``drawn``."""
        return sum(self.piece_size[p] for p in self.pieces[node] - drawn)

    def budgets(self, target: Circuit, by_kind: bool) -> dict[str, int]:
        """Parameters ``target`` unlocks, counted on the union: in total, or per node kind
        (a shared bias belongs to one kind: b_O to head senders, b_out to MLP senders)."""
        used = self.node_indices(target)
        if not by_kind:
            return {"all": self._union(used)}
        budgets: dict[str, int] = {}
        for kind in dict.fromkeys(self.nodes[i][2] for i in used):
            budgets[kind] = self._union([i for i in used if self.nodes[i][2] == kind])
        return budgets

    def draw(self, budgets: dict[str, int], generator: torch.Generator) -> Circuit:
        """A random circuit whose nodes fill each budget (``"all"``: any kind) without
        exceeding it: nodes in random order, each kept when its cost fits what is left,
        offered again until none fits (the bound in the module docstring)."""
        waiting = torch.randperm(len(self.nodes), generator=generator).tolist()
        left = dict(budgets)
        drawn: set[Piece] = set()
        chosen: list[int] = []
        kept = True
        while kept:
            kept, still = False, []
            for i in waiting:
                key = "all" if "all" in left else self.nodes[i][2]
                cost = self.cost(i, drawn)
                if 0 < cost <= left.get(key, 0):
                    chosen.append(i)
                    drawn |= self.pieces[i]
                    left[key] -= cost
                    kept = True
                else:
                    still.append(i)
            waiting = still
        return self._circuit([self.nodes[i] for i in chosen])
