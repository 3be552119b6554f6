"""Where the graph's nodes live in a TransformerBridge, and hooks that read or patch them.

This is the only module that knows hook names. It maps each group of graph nodes to one
hook point and gives two building blocks that attribution, faithfulness and masking share:

- `sender_hooks`: forward hooks that hand each sender group's output (``[batch, pos, d]``
  for ``input`` and MLPs, ``[batch, pos, heads, d]`` for heads) to a callback together with
  the rows it occupies in the graph's sender list;
- `receiver_hooks`: forward hooks that hand each receiver group's input to a callback with
  its columns and the number of senders it may read (always a prefix of the sender list),
  and use the callback's return value as the new input.

Receiver inputs are the tensors each component reads *before* its LayerNorm: per-head
``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` (per KV head under grouped-query
attention), ``hook_mlp_in`` for MLPs and ``ln_final.hook_in`` for the logits. The tensor a
hook receives at ``hook_mlp_in`` and ``ln_final.hook_in`` is the residual stream itself, which
the skip connection also uses; the receiver callbacks therefore always get a fresh copy, so
a gradient taken on it belongs to that receiver alone (DESIGN.md, the MLP pitfall). The q/k/v
inputs need no copy: the bridge forks the residual stream into a new contiguous
``[batch, pos, heads, d]`` tensor per hook (checked by finite differences in
tests/test_attribution.py).

`run_to_final_residual` and `final_logits` let a pass stop at the final residual stream and
unembed only the positions a metric reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ctlens.graph import Graph
from ctlens.types import NodeKind

SenderCallback = Callable[[slice, torch.Tensor], None]
"""``fn(rows, activation)``: ``rows`` are sender indices; ``activation`` is ``[b, p, (n), d]``."""

ReceiverCallback = Callable[[slice, int, torch.Tensor], torch.Tensor]
"""``fn(columns, n_upstream, x) -> x'``: ``x`` is ``[b, p, (n), d]``, a fresh tensor."""


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

    logits_in = "ln_final.hook_in"


def sender_hooks(
    model: Any, graph: Graph, callback: SenderCallback
) -> list[tuple[str, Callable[..., None]]]:
    """Forward hooks that report every sender group's output to ``callback``.

    The ``input`` sender is the sum of the token and position embeddings: the callback is
    called once per embedding hook with the same row, so it must accumulate.
    """
    layout = HookLayout.from_model(model)
    hooks: list[tuple[str, Callable[..., None]]] = []

    def make(rows: slice) -> Callable[..., None]:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            callback(rows, activation)

        return hook

    for name in layout.input_hooks:
        hooks.append((name, make(slice(0, 1))))
    for layer in range(layout.n_layers):
        hooks.append((layout.head_out(layer), make(graph.sender_slice(layer))))
        mlp = graph.mlp_sender(layer)
        hooks.append((layout.mlp_out(layer), make(slice(mlp, mlp + 1))))
    return hooks


def receiver_hooks(
    model: Any, graph: Graph, callback: ReceiverCallback
) -> list[tuple[str, Callable[..., torch.Tensor]]]:
    """Forward hooks that pass every receiver group's input through ``callback``."""
    layout = HookLayout.from_model(model)
    hooks: list[tuple[str, Callable[..., torch.Tensor]]] = []

    def make(columns: slice, fresh: bool) -> Callable[..., torch.Tensor]:
        n_upstream = graph.upstream[columns.start]

        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            return callback(columns, n_upstream, x.clone() if fresh else x)

        return hook

    for layer in range(layout.n_layers):
        for kind in (NodeKind.Q, NodeKind.K, NodeKind.V):
            hooks.append(
                (layout.qkv_in(layer, kind), make(graph.receiver_slice(layer, kind), False))
            )
        hooks.append((layout.mlp_in(layer), make(graph.receiver_slice(layer, NodeKind.MLP), True)))
    last = graph.n_receivers - 1
    hooks.append((layout.logits_in, make(slice(last, last + 1), True)))
    return hooks


class _StopForward(Exception):
    """Raised by the last hook of `run_to_final_residual` to skip the unembedding."""


def run_to_final_residual(
    model: Any, tokens: torch.Tensor, fwd_hooks: list[tuple[str, Callable[..., Any]]]
) -> torch.Tensor:
    """Run ``model`` with ``fwd_hooks`` up to the final residual stream and return it.

    The forward stops at the logits receiver's input (``ln_final.hook_in``, after any hook of
    ``fwd_hooks`` there has run), so the unembedding, the most expensive matrix product of
    a large-vocabulary model, is never computed for positions no metric reads. Get logits
    at chosen positions with `final_logits`. Hooks are removed on the way out.
    """
    captured: list[torch.Tensor] = []

    def stop(x: torch.Tensor, hook: Any) -> None:
        captured.append(x)
        raise _StopForward

    with contextlib.suppress(_StopForward):
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (HookLayout.logits_in, stop)])
    if not captured:
        raise RuntimeError(
            f"{HookLayout.logits_in} never fired; is this a ctlens.load_model bridge?"
        )
    return captured[0]


def final_logits(model: Any, residual: torch.Tensor) -> torch.Tensor:
    """Logits from final-residual vectors ``[..., d_model]`` (final norm, then unembedding)."""
    return model.unembed(model.ln_final(residual))


def supports_truncated_forward(model: Any) -> bool:
    """True when the bridge exposes ``ln_final`` and ``unembed`` for `final_logits`."""
    return all(hasattr(model, name) for name in ("ln_final", "unembed"))


def flat(x: torch.Tensor) -> torch.Tensor:
    """View a ``[b, p, d]`` activation as ``[b, p, 1, d]`` so every group has a node axis."""
    return x[:, :, None] if x.ndim == 3 else x


@contextlib.contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    """Inside: no parameter requires grad (so backward computes activation grads only).

    On exit every parameter's ``requires_grad`` is restored.
    """
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Inside: every module of the model is in eval mode (no dropout).

    On exit each module gets its own previous mode back: a model may mix train and eval
    submodules (a frozen part kept in eval, say), and ``model.train(flag)`` would overwrite
    all of them with the top-level mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: Any) -> torch.device:
    """The device of the model's (first) parameter."""
    return next(model.parameters()).device
