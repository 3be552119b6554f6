"""Where each graph node lives in a TransformerBridge: hook names, nothing else.

This is the one place that spells TransformerLens hook names for the graph's nodes.
`HookLayout` names the hook points a family exposes; `node_hook` maps one node (a `Node`
of `ctlens.types`) to the hook it writes as a sender or reads as a receiver, as a
`HookRef` ``(name, index)``. It depends on the shared types alone, so `ctlens.graph`
(`Graph.hook_name`) and every stage above it can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from ctlens.types import Node, NodeKind


@dataclass(frozen=True)
class HookLayout:
    """Hook names for one model family."""

    input_hooks: tuple[str, ...]
    n_layers: int

    @classmethod
    def from_model(cls, model: Any) -> HookLayout:
        """The layout of a `ctlens.load_model` bridge (token and, if any, position embedding)."""
        hooks = model.hook_dict
        inputs = tuple(name for name in ("hook_embed", "hook_pos_embed") if name in hooks)
        if "hook_embed" not in inputs:
            raise ValueError("the model has no hook_embed; is it a ctlens.load_model bridge?")
        return cls(input_hooks=inputs, n_layers=model.cfg.n_layers)

    @staticmethod
    def head_out(layer: int) -> str:
        """Per-head outputs of layer ``layer``: ``[batch, pos, n_heads, d_model]``, no b_O."""
        return f"blocks.{layer}.attn.hook_result"

    @staticmethod
    def mlp_out(layer: int) -> str:
        """Output of MLP ``layer``: ``[batch, pos, d_model]``."""
        return f"blocks.{layer}.hook_mlp_out"

    @staticmethod
    def qkv_in(layer: int, kind: NodeKind) -> str:
        """Per-head (per KV head for k/v under GQA) pre-LN q/k/v inputs of layer ``layer``."""
        return f"blocks.{layer}.hook_{kind.value}_input"

    @staticmethod
    def mlp_in(layer: int) -> str:
        """Pre-LN input of MLP ``layer`` (the residual stream itself: copy before patching)."""
        return f"blocks.{layer}.hook_mlp_in"

    @staticmethod
    def mlp_post(layer: int) -> str:
        """The activation MLP ``layer``'s output projection reads ``[batch, pos, d_mlp]``."""
        return f"blocks.{layer}.mlp.out.hook_in"

    @staticmethod
    def mlp_projection_out(layer: int, projection: str) -> str:
        """The output of MLP ``layer``'s ``"in"`` or ``"gate"`` projection (pre-activation)."""
        return f"blocks.{layer}.mlp.{projection}.hook_out"

    @staticmethod
    def post_norm(layer: int, which: str, point: str) -> str:
        """A post-sublayer norm's hook (frozen-norm families): ``which`` is ``"ln1_post"``
        (attention) or ``"ln2_post"`` (MLP), ``point`` is ``"hook_scale"`` or ``"hook_out"``."""
        return f"blocks.{layer}.{which}.{point}"

    logits_in = "ln_final.hook_in"
    input_stream = "blocks.0.hook_resid_pre"
    """The residual stream entering block 0: the ``input`` sender (token + position
    embedding), which ctlens itself records as the sum of ``hook_embed`` and
    ``hook_pos_embed``."""


Role = Literal["sender", "receiver"]


class HookRef(NamedTuple):
    """The TransformerLens hook point a graph node writes (sender) or reads (receiver).

    ``index`` is the node's position on the head axis (dim 2) of a ``[batch, pos, n, d]``
    hook (head outputs, per-head q inputs, per-KV-head k/v inputs); ``None`` when the node
    is the whole ``[batch, pos, d]`` activation.
    """

    name: str
    index: int | None = None

    def take(self, activation: torch.Tensor) -> torch.Tensor:
        """This node's part of the hook's ``activation`` (from ``run_with_cache`` or a hook)."""
        return activation if self.index is None else activation[:, :, self.index]


class NeuronGroupRef(HookRef):
    """The hook of an MLP neuron-group sender ``m{l}.n{j}``: the MLP's post-activation
    neurons (``mlp.out.hook_in``), of which group ``index`` holds the j-th of ``groups``
    equal blocks. The group's residual output is its neurons times its rows of W_out."""

    groups: int

    def __new__(cls, name: str, index: int, groups: int) -> NeuronGroupRef:
        ref = super().__new__(cls, name, index)
        ref.groups = groups
        return ref

    def take(self, activation: torch.Tensor) -> torch.Tensor:
        """The group's neurons ``[..., d_mlp / groups]``."""
        return activation.unflatten(-1, (self.groups, -1))[..., self.index, :]


# (role, kind) -> the hook of a node of that kind; one entry per node kind, so new kinds of
# node (MLP neuron groups, say) add a line here.
_NODE_HOOKS: dict[tuple[str, NodeKind], Callable[[Node], HookRef]] = {
    ("sender", NodeKind.INPUT): lambda n: HookRef(HookLayout.input_stream),
    ("sender", NodeKind.HEAD): lambda n: HookRef(HookLayout.head_out(n.layer), n.head),
    ("sender", NodeKind.MLP): lambda n: HookRef(HookLayout.mlp_out(n.layer)),
    ("receiver", NodeKind.Q): lambda n: HookRef(HookLayout.qkv_in(n.layer, n.kind), n.head),
    ("receiver", NodeKind.K): lambda n: HookRef(HookLayout.qkv_in(n.layer, n.kind), n.head),
    ("receiver", NodeKind.V): lambda n: HookRef(HookLayout.qkv_in(n.layer, n.kind), n.head),
    ("receiver", NodeKind.MLP): lambda n: HookRef(HookLayout.mlp_in(n.layer)),
    ("receiver", NodeKind.LOGITS): lambda n: HookRef(HookLayout.logits_in),
}


# Under the frozen-norm linearisation an MLP's sender output is its normalised output.
_FROZEN_NORM_HOOKS: dict[tuple[str, NodeKind], Callable[[Node], HookRef]] = {
    ("sender", NodeKind.MLP): lambda n: HookRef(
        HookLayout.post_norm(n.layer, "ln2_post", "hook_out")
    ),
}


def node_hook(
    node: Node, role: Role, approximate: str | None = None, mlp_groups: int = 1
) -> HookRef:
    """The hook a sender node writes or a receiver node reads (see `Graph.hook_name`)."""
    if node.kind is NodeKind.MLP and mlp_groups != 1:
        if role == "receiver":  # every group reads the whole MLP input
            return HookRef(HookLayout.mlp_in(node.layer))  # type: ignore[arg-type]
        return NeuronGroupRef(HookLayout.mlp_post(node.layer), node.head, mlp_groups)
    if approximate == "frozen-norm" and (role, node.kind) in _FROZEN_NORM_HOOKS:
        return _FROZEN_NORM_HOOKS[(role, node.kind)](node)
    try:
        return _NODE_HOOKS[(role, node.kind)](node)
    except KeyError:
        raise ValueError(f"{node.name} ({node.kind.value}) has no {role} hook") from None
