"""Where the graph's nodes live in a TransformerBridge, and hooks that read or patch them.

Hook names come from `ctlens.bridge.names`. This module maps each group of graph nodes to
its hook point and gives two building blocks that attribution, faithfulness and masking
share:

- `sender_hooks`: forward hooks that hand each sender group's output (``[batch, pos, d]``
  for ``input`` and MLPs, ``[batch, pos, heads, d]`` for heads, ``[batch, pos, G, d]`` for
  the neuron groups of a graph built with ``mlp_groups=G``, or, given a ``hidden``
  callback, a grouped MLP's hidden activation ``[batch, pos, d_mlp]`` instead) to a callback
  together with the rows it occupies in the graph's sender list;
- `receiver_hooks`: forward hooks that hand each receiver group's input to a callback with
  its columns and the number of senders it may read (always a prefix of the sender list),
  and use the callback's return value as the new input; `group_gradient_hooks` hand the
  neuron groups' input gradients on instead, during the backward.

Receiver inputs are the tensors each component reads *before* its LayerNorm: per-head
``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` (per KV head under grouped-query
attention), ``hook_mlp_in`` for MLPs (on a grouped graph one input for all its neuron
groups, of which some may get inputs of their own, see `ctlens.bridge.mlp_groups`) and
``ln_final.hook_in`` for the logits. The tensor a hook
receives at ``hook_mlp_in`` and ``ln_final.hook_in`` is the residual stream itself, which
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
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from ctlens.bridge import mlp_groups
from ctlens.bridge.mlp_groups import GroupedInput, Watch
from ctlens.bridge.names import HookLayout
from ctlens.types import NodeKind

if TYPE_CHECKING:  # annotations only: the graph is passed in, never imported at run time
    from ctlens.graph import Graph

SenderCallback = Callable[[slice, torch.Tensor], None]
"""``fn(rows, activation)``: ``rows`` are sender indices; ``activation`` is ``[b, p, (n), d]``."""

HiddenCallback = Callable[[int, torch.Tensor], None]
"""``fn(layer, hidden)``: a grouped MLP's hidden activation ``[b, p, d_mlp]``."""

ReceiverCallback = Callable[[slice, int, torch.Tensor], "torch.Tensor | GroupedInput"]
"""``fn(columns, n_upstream, x) -> x'``: ``x`` is ``[b, p, (n), d]``, a fresh tensor. A grouped
MLP's columns get its one ``[b, p, d]`` input, read by every group, and may return a
`GroupedInput` that gives some groups inputs of their own."""


def sender_hooks(
    model: Any, graph: Graph, callback: SenderCallback, hidden: HiddenCallback | None = None
) -> list[tuple[str, Callable[..., None]]]:
    """Forward hooks that report every sender group's output to ``callback``.

    The ``input`` sender is the sum of the token and position embeddings: the callback is
    called once per embedding hook with the same row, so it must accumulate. Under the
    frozen-norm linearisation (``graph.spec.approximate``) head and MLP outputs are read
    after the post-sublayer norm (`frozen_norm_hooks`). With ``hidden``, a grouped MLP
    reports its hidden activation to ``hidden`` (``d_mlp`` per token) instead of its groups'
    outputs to ``callback`` (``G * d_model`` per token).
    """
    layout = HookLayout.from_model(model)
    hooks: list[tuple[str, Callable[..., None]]] = []

    def make(rows: slice) -> Callable[..., None]:
        def hook(activation: torch.Tensor, hook: Any) -> None:
            callback(rows, activation)

        return hook

    for name in layout.input_hooks:
        hooks.append((name, make(slice(0, 1))))
    if graph.spec.approximate == "frozen-norm":
        return hooks + frozen_norm_hooks(model, graph, callback)
    groups = graph.spec.mlp_groups
    for layer in range(layout.n_layers):
        hooks.append((layout.head_out(layer), make(graph.sender_slice(layer))))
        if groups == 1:
            hooks.append((layout.mlp_out(layer), make(graph.mlp_senders(layer))))
        elif hidden is not None:
            hooks.append((layout.mlp_post(layer), _hidden_hook(hidden, layer)))
        else:
            report = partial(callback, graph.mlp_senders(layer))
            hooks.append(mlp_groups.sender_hook(model, layer, groups, report))
    return hooks


class EdgeHooks:
    """What a forward rewritten at a graph's edges shares (`ctlens.masking.EdgeMask`,
    `ctlens.learning.GatedForward`): one hook list, every sender's output then every
    receiver's input, whose first input hook marks a new forward (``_new_forward``), and
    `paused`. Subclasses define ``_on_sender`` and ``_on_receiver``, and ``_on_hidden``
    when they read a grouped MLP's hidden activation (`sender_hooks`)."""

    _on_hidden: HiddenCallback | None = None

    def __init__(self, model: Any, graph: Graph) -> None:
        self.model = model
        self.graph = graph
        self._new_forward = False
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside: forwards run plain (the hooks stay installed but do nothing)."""
        before = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = before

    def hooks(self) -> list[tuple[str, Any]]:
        """The ``(hook_name, fn)`` pairs to install: sender outputs, then receiver inputs."""
        first_input = HookLayout.from_model(self.model).input_hooks[0]
        hooks: list[tuple[str, Any]] = []
        for name, fn in sender_hooks(self.model, self.graph, self._on_sender, self._on_hidden):
            hooks.append((name, self._marks_new_forward(fn) if name == first_input else fn))
        return hooks + receiver_hooks(self.model, self.graph, self._on_receiver)

    def _marks_new_forward(self, fn: Any) -> Any:
        def hook(activation: torch.Tensor, hook: Any) -> Any:
            self._new_forward = True
            return fn(activation, hook)

        return hook

    def _on_sender(self, rows: slice, act: torch.Tensor) -> None:
        raise NotImplementedError

    def _on_receiver(self, columns: slice, n_up: int,
                     x: torch.Tensor) -> torch.Tensor | GroupedInput:
        raise NotImplementedError


def _hidden_hook(hidden: HiddenCallback, layer: int) -> Callable[..., None]:
    def hook(post: torch.Tensor, hook: Any) -> None:
        hidden(layer, post)

    return hook


def frozen_norm_hooks(
    model: Any, graph: Graph, callback: SenderCallback
) -> list[tuple[str, Callable[..., None]]]:
    """Sender hooks of the frozen-norm linearisation (Gemma 2/3, OLMo-2).

    These models add ``norm(y)`` to the residual stream, where ``y`` is a sublayer's whole
    output. A head's sender output is its share of that, ``w_eff * result_h / rms(y)``
    with the scale of the *same run* (``w_eff`` is ``1 + w`` for Gemma, ``w`` for OLMo-2):
    the shares of a layer's heads sum exactly to the normalised output. An MLP's sender
    output is its normalised output. Patching some senders does not recompute the other
    senders' scale: that is the approximation (docs/attribution.md).
    """
    hooks: list[tuple[str, Callable[..., None]]] = []
    for layer in range(graph.spec.n_layers):
        rows = graph.sender_slice(layer)
        norm = model.blocks[layer].ln1_post
        stash: dict[str, torch.Tensor] = {}

        def keep(key: str, stash: dict[str, torch.Tensor] = stash) -> Callable[..., None]:
            def hook(x: torch.Tensor, hook: Any) -> None:
                stash[key] = x

            return hook

        def share(
            out: torch.Tensor,
            hook: Any,
            rows: slice = rows,
            norm: Any = norm,
            stash: dict[str, torch.Tensor] = stash,
        ) -> None:
            result, scale = stash.pop("result"), stash.pop("scale")
            weight = 1.0 + norm.weight if norm.uses_weight_offset else norm.weight
            callback(rows, (result * (weight / scale[:, :, None])).to(result.dtype))

        hooks += [
            (HookLayout.head_out(layer), keep("result")),
            (HookLayout.post_norm(layer, "ln1_post", "hook_scale"), keep("scale")),
            (HookLayout.post_norm(layer, "ln1_post", "hook_out"), share),
        ]
        mlp = graph.mlp_sender(layer)
        out = HookLayout.post_norm(layer, "ln2_post", "hook_out")
        hooks.append((out, lambda x, hook, r=slice(mlp, mlp + 1): callback(r, x)))
    return hooks


def receiver_hooks(
    model: Any, graph: Graph, callback: ReceiverCallback, groups: bool = True
) -> list[tuple[str, Callable[..., torch.Tensor]]]:
    """Forward hooks that pass every receiver group's input through ``callback``.

    ``groups=False`` leaves out a grouped graph's MLP receivers (see `group_gradient_hooks`).
    """
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
        columns = graph.receiver_slice(layer, NodeKind.MLP)
        if graph.spec.mlp_groups == 1:
            hooks.append((layout.mlp_in(layer), make(columns, True)))
        elif groups:
            transform = partial(_fresh_call, callback, columns, graph.upstream[columns.start])
            hooks += mlp_groups.receiver_hooks(model, layer, graph.spec.mlp_groups, transform)
    last = graph.n_receivers - 1
    hooks.append((layout.logits_in, make(slice(last, last + 1), True)))
    return hooks


def _fresh_call(
    callback: ReceiverCallback, columns: slice, n_upstream: int, x: torch.Tensor
) -> torch.Tensor | GroupedInput:
    return callback(columns, n_upstream, x.clone())


def group_gradient_hooks(
    model: Any,
    graph: Graph,
    watch: Watch,
    callback: Callable[[slice, int, Callable[[torch.Tensor], None]], None],
    chunk: int,
) -> list[tuple[str, Callable[..., None]]]:
    """Hooks that hand a grouped graph's MLP receiver gradients to ``callback`` during the
    backward: ``fn(columns, n_upstream, fill)``, where ``fill(out)`` writes the columns'
    gradients into ``out`` (``[len(columns), b, p, d]``), at most ``chunk`` columns at a time
    (`ctlens.bridge.mlp_groups.gradient_hooks`). ``watch(tensor, hook)`` registers each
    gradient hook (the caller keeps the handles)."""
    hooks: list[tuple[str, Callable[..., None]]] = []
    for layer in range(graph.spec.n_layers):
        columns = graph.receiver_slice(layer, NodeKind.MLP)
        n_up = graph.upstream[columns.start]

        def on_gradient(select: slice, fill: Callable[[torch.Tensor], None],
                        first: int = columns.start, n_up: int = n_up) -> None:
            callback(slice(first + select.start, first + select.stop), n_up, fill)

        groups = graph.spec.mlp_groups
        hooks += mlp_groups.gradient_hooks(model, layer, groups, watch, on_gradient, chunk)
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
