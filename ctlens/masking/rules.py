"""Which parameter entries each graph node owns: the rules behind `restrict_gradients`.

A circuit unlocks a node's parameters when the node takes part in a circuit edge: as a
sender (it sends along at least one edge) or as a receiver (it reads along at least one).
In a positional circuit that means at any span: parameters are shared across positions, so
a node whose edge is kept at one span moves for every position (the forward mask, not the
gradient restriction, is what makes an edge act at its span only).
What a node unlocks is looked up by its role and kind in two tables, `SENDER_RULES` and
`RECEIVER_RULES`, each entry a small function that names the slices it opens:

| role, kind | opens |
|---|---|
| sender ``input`` | token and position embeddings (only with ``train_embeddings``) |
| sender head ``a{l}.h{h}`` | its inputs of W_O, and b_O (shared by the layer's heads) |
| sender MLP ``m{l}`` | W_out, b_out |
| sender MLP group ``m{l}.n{j}`` | its neurons' rows of W_out, and b_out (shared by the groups) |
| receiver q / k / v | that (KV) head's outputs of W_Q / W_K / W_V and of their biases |
| receiver MLP ``m{l}`` | W_in, the gate of a gated MLP, b_in |
| receiver MLP group ``m{l}.n{j}`` | its neurons' columns of W_in (and of the gate) and of b_in |
| receiver ``logits`` | the unembedding (only with ``train_unembedding``) |

LayerNorms belong to no node and never move. The parameters themselves are read from the
bridge's components (`ModelParts`: ``blocks[l].attn.q/k/v/o``, ``blocks[l].mlp.in/gate/out``,
``embed``, ``pos_embed``, ``unembed``); `Projection` hides whether a weight is an
``nn.Linear`` (``[out, in]``) or GPT-2's ``Conv1D`` (``[in, out]``). On GPT-2 the bridge's
q/k/v weights are strided views of the fused ``c_attn`` parameter; the views are what
receive gradients, so they are the ones sliced, and the fused parameter (which shares their
storage) is left out of the rules.

To support a new node kind add its `NodeRule` to the table of its role; to support a model
family whose components differ (say, a fused gate/up projection) teach
`ModelParts.from_model` where they are. `parameter_rules` itself does not change. MLP
neuron groups (``mlp_groups`` > 1, `ctlens.bridge.mlp_groups`) are MLP nodes whose ``head`` is the
group index; the MLP rules open only that group's neurons.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool
from torch import nn

from ctlens.bridge.families import hf_component, output_axis
from ctlens.circuit import Circuit
from ctlens.graph import require_graph_of
from ctlens.types import Node, NodeKind


@dataclass(frozen=True)
class ParameterRule:
    """Which entries of one parameter may change under a circuit (True = trainable)."""

    name: str
    parameter: nn.Parameter
    trainable: Bool[torch.Tensor, "..."]

    @property
    def n_trainable(self) -> int:
        return int(self.trainable.sum())


# ------------------------------------------------------------------------------ model parts


@dataclass(frozen=True)
class Projection:
    """One weight (and optional bias) of the model, with index helpers for its two axes."""

    module: nn.Module
    where: str  # e.g. "blocks[0].attn.q", for error messages

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def outputs(self, index: slice) -> tuple[Any, ...]:
        """The weight entries that produce outputs ``index``."""
        axis = output_axis(self.module, self.where)
        return (index,) if axis == 0 else (slice(None), index)

    def inputs(self, index: slice) -> tuple[Any, ...]:
        """The weight entries that read inputs ``index``."""
        axis = output_axis(self.module, self.where)
        return (slice(None), index) if axis == 0 else (index,)


def _component(parent: Any, name: str, where: str) -> Projection | None:
    """The HF module behind the bridge component ``parent.name`` (None when absent)."""
    child = getattr(parent, name, None)
    if child is None:
        return None
    return Projection(hf_component(child, f"{where}.{name}"), f"{where}.{name}")


@dataclass(frozen=True)
class LayerParts:
    """The projections of one transformer block."""

    attn: dict[NodeKind, Projection]  # Q, K, V, HEAD (the output projection W_O)
    mlp_in: tuple[Projection, ...]  # the input projection and, if gated, the gate
    mlp_out: Projection


@dataclass(frozen=True)
class ModelParts:
    """Where a bridge keeps the parameters the rules open."""

    layers: tuple[LayerParts, ...]
    embeddings: tuple[Projection, ...]  # token and (if any) position embedding
    unembed: Projection | None
    d_head: int

    @classmethod
    def from_model(cls, model: Any) -> ModelParts:
        """Read the components of a `ctlens.load_model` bridge, refusing unknown layouts."""
        layers = []
        for layer in range(int(model.cfg.n_layers)):
            where = f"blocks[{layer}]"
            block = model.blocks[layer]
            attn = {
                kind: _component(block.attn, name, f"{where}.attn")
                for kind, name in (
                    (NodeKind.Q, "q"), (NodeKind.K, "k"), (NodeKind.V, "v"), (NodeKind.HEAD, "o")
                )
            }
            if any(p is None for p in attn.values()):
                raise ValueError(
                    f"{where}.attn lacks separate q/k/v/o components; restrict_gradients needs "
                    "the bridge's split attention projections"
                )
            for projection in attn.values():
                assert projection is not None
                output_axis(projection.module, projection.where)  # refuse unknown weights now
            inputs = [_component(block.mlp, name, f"{where}.mlp") for name in ("in", "gate")]
            output = _component(block.mlp, "out", f"{where}.mlp")
            if inputs[0] is None or output is None:
                raise ValueError(f"{where}.mlp lacks in/out components; cannot map MLP parameters")
            layers.append(
                LayerParts(
                    attn=attn,  # type: ignore[arg-type]
                    mlp_in=tuple(p for p in inputs if p is not None),
                    mlp_out=output,
                )
            )
        embeddings = [_component(model, name, "model") for name in ("embed", "pos_embed")]
        return cls(
            layers=tuple(layers),
            embeddings=tuple(p for p in embeddings if p is not None),
            unembed=_component(model, "unembed", "model"),
            d_head=int(model.cfg.d_head),
        )

    def head(self, index: int) -> slice:
        """The ``d_head`` channels of (KV) head ``index`` in a q/k/v output or a W_O input."""
        return slice(index * self.d_head, (index + 1) * self.d_head)

    def projections(self) -> Iterator[Projection]:
        """Every projection the rules know, in model order."""
        for layer in self.layers:
            yield from layer.attn.values()
            yield from layer.mlp_in
            yield layer.mlp_out
        yield from self.embeddings
        if self.unembed is not None:
            yield self.unembed


# ------------------------------------------------------------------------------ rule tables


@dataclass(frozen=True)
class RuleOptions:
    """Switches that open parameters no circuit opens by default."""

    train_embeddings: bool = False
    train_unembedding: bool = False
    mlp_groups: int = 1  # neuron groups per MLP in the circuit's graph (ctlens.bridge.mlp_groups)


Opening = tuple[torch.Tensor | None, tuple[Any, ...]]
"""``(parameter, index)``: the entries ``parameter[index]`` become trainable (None: skip)."""

NodeRule = Callable[[ModelParts, Node, RuleOptions], Iterable[Opening]]
"""``rule(parts, node, options)`` -> the slices that ``node`` opens."""


def _whole(projection: Projection) -> Iterator[Opening]:
    yield projection.weight, (...,)
    yield projection.bias, (...,)


def _input_sender(parts: ModelParts, node: Node, options: RuleOptions) -> Iterator[Opening]:
    if options.train_embeddings:
        for embedding in parts.embeddings:
            yield embedding.weight, (...,)


def _head_sender(parts: ModelParts, node: Node, options: RuleOptions) -> Iterator[Opening]:
    assert node.layer is not None and node.head is not None
    output = parts.layers[node.layer].attn[NodeKind.HEAD]
    yield output.weight, output.inputs(parts.head(node.head))
    yield output.bias, (...,)  # b_O, shared by the layer's heads: moves when any head sends


def _neurons(projection: Projection, node: Node, options: RuleOptions, axis: int) -> slice:
    """The neurons of MLP group ``node`` (its ``head`` is the group index)."""
    assert node.head is not None
    d_mlp = projection.weight.shape[axis]
    width = d_mlp // options.mlp_groups
    return slice(node.head * width, (node.head + 1) * width)


def _mlp_sender(parts: ModelParts, node: Node, options: RuleOptions) -> Iterator[Opening]:
    assert node.layer is not None
    output = parts.layers[node.layer].mlp_out
    if node.head is None:
        yield from _whole(output)
        return
    axis = 1 - output_axis(output.module, output.where)  # the input (neuron) axis
    yield output.weight, output.inputs(_neurons(output, node, options, axis))
    yield output.bias, (...,)  # b_out, shared by the MLP's groups: moves when any group sends


def _qkv_receiver(parts: ModelParts, node: Node, options: RuleOptions) -> Iterator[Opening]:
    assert node.layer is not None and node.head is not None
    projection = parts.layers[node.layer].attn[node.kind]
    channels = parts.head(node.head)
    yield projection.weight, projection.outputs(channels)
    yield projection.bias, (channels,)


def _mlp_receiver(parts: ModelParts, node: Node, options: RuleOptions) -> Iterator[Opening]:
    assert node.layer is not None
    for projection in parts.layers[node.layer].mlp_in:
        if node.head is None:
            yield from _whole(projection)
            continue
        neurons = _neurons(projection, node, options,
                           output_axis(projection.module, projection.where))
        yield projection.weight, projection.outputs(neurons)
        yield projection.bias, (neurons,)


def _logits_receiver(parts: ModelParts, node: Node, options: RuleOptions) -> Iterator[Opening]:
    if options.train_unembedding and parts.unembed is not None:
        yield from _whole(parts.unembed)


SENDER_RULES: dict[NodeKind, NodeRule] = {
    NodeKind.INPUT: _input_sender,
    NodeKind.HEAD: _head_sender,
    NodeKind.MLP: _mlp_sender,
}
"""What a node opens when it sends along a circuit edge, by node kind."""

RECEIVER_RULES: dict[NodeKind, NodeRule] = {
    NodeKind.Q: _qkv_receiver,
    NodeKind.K: _qkv_receiver,
    NodeKind.V: _qkv_receiver,
    NodeKind.MLP: _mlp_receiver,
    NodeKind.LOGITS: _logits_receiver,
}
"""What a node opens when it reads along a circuit edge, by node kind."""


# ------------------------------------------------------------------------------ the rules


def parameter_rules(
    model: Any,
    circuit: Circuit,
    train_embeddings: bool = False,
    train_unembedding: bool = False,
) -> list[ParameterRule]:
    """The per-parameter trainable masks that `restrict_gradients` enforces.

    Covers every parameter of ``model`` that can receive a gradient (each listed once);
    parameters that only alias another one's storage (GPT-2's fused ``c_attn`` weight, whose
    q/k/v views are what receive gradients) are not listed. A tied embedding/unembedding
    weight is trainable when either side is. Plain tensors that are not parameters (the
    bridge's constant unembedding bias) are skipped.
    """
    mapped, openings = rule_openings(model, circuit, train_embeddings, train_unembedding)
    masks = {id(p): torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in mapped}
    for p, index in openings:
        masks[id(p)][index] = True
    return _listed(model, masks, {id(p): p for p in mapped})


def rule_openings(
    model: Any,
    circuit: Circuit,
    train_embeddings: bool = False,
    train_unembedding: bool = False,
) -> tuple[list[nn.Parameter], list[tuple[nn.Parameter, tuple[Any, ...]]]]:
    """``(mapped, openings)``: the parameters the rules know (each once, all frozen until
    opened) and the ``(parameter, index)`` slices ``circuit`` opens in them.

    Reads only the model's structure and parameter shapes, never their values, so it works
    on sharded parameters (`ctlens.tuning.local_rules` cuts the openings to a rank's rows).
    """
    graph = require_graph_of(model, circuit.graph)
    parts = ModelParts.from_model(model)
    options = RuleOptions(train_embeddings, train_unembedding, graph.spec.mlp_groups)
    mapped: dict[int, nn.Parameter] = {}
    for projection in parts.projections():
        for p in (projection.weight, projection.bias):
            if isinstance(p, nn.Parameter):
                mapped.setdefault(id(p), p)
    openings: list[tuple[nn.Parameter, tuple[Any, ...]]] = []
    for role, table, nodes, active in (
        ("sender", SENDER_RULES, graph.sender_nodes, circuit.sender_receiver_mask.any(1)),
        ("receiver", RECEIVER_RULES, graph.receiver_nodes, circuit.sender_receiver_mask.any(0)),
    ):
        for i in active.nonzero()[:, 0].tolist():
            node = nodes[i]
            rule = table.get(node.kind)
            if rule is None:
                raise ValueError(
                    f"restrict_gradients has no parameter rule for {role} {node.name!r} "
                    f"(kind {node.kind.value!r}); add one to ctlens.masking.rules"
                )
            openings.extend((p, index) for p, index in rule(parts, node, options)
                            if isinstance(p, nn.Parameter))
    return list(mapped.values()), openings


def _listed(
    model: Any, masks: dict[int, torch.Tensor], params: dict[int, nn.Parameter]
) -> list[ParameterRule]:
    """One rule per parameter in ``named_parameters()`` order; unmapped ones frozen, aliases
    of mapped storage (GPT-2's fused qkv) left out."""
    named = list(model.named_parameters())
    listed = {id(p) for _, p in named}
    if any(key not in listed for key in masks):
        raise ValueError(
            "restrict_gradients mapped a weight that model.named_parameters() does not list; "
            "the bridge layout is not the one ctlens knows"
        )
    mapped_ranges = [_memory_range(params[key]) for key in params]
    rules: list[ParameterRule] = []
    for name, p in named:
        if id(p) in masks:
            rules.append(ParameterRule(name, p, masks[id(p)]))
        elif _overlaps(_memory_range(p), mapped_ranges):
            continue  # an alias (GPT-2's fused qkv): its mapped views carry the gradients
        else:
            frozen = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            rules.append(ParameterRule(name, p, frozen))
    return rules


def _memory_range(p: torch.Tensor) -> tuple[int, int, int]:
    """``(storage id, first byte, last byte + 1)`` that ``p``'s elements can occupy."""
    if p.numel() == 0:
        return (p.untyped_storage().data_ptr(), 0, 0)
    span = sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride(), strict=True))
    start = p.data_ptr()
    return (p.untyped_storage().data_ptr(), start, start + (span + 1) * p.element_size())


def _overlaps(r: tuple[int, int, int], ranges: list[tuple[int, int, int]]) -> bool:
    return any(r[0] == o[0] and r[1] < o[2] and o[1] < r[2] for o in ranges)


__all__ = [
    "RECEIVER_RULES",
    "SENDER_RULES",
    "LayerParts",
    "ModelParts",
    "NodeRule",
    "ParameterRule",
    "Projection",
    "RuleOptions",
    "parameter_rules",
    "rule_openings",
]
