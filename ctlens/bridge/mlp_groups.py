"""MLP neuron groups ("MLP heads"): the hooks that make each group a sender and a receiver.

With ``Graph.from_model(model, mlp_groups=G)`` each MLP's ``d_mlp`` neurons are split into G
equal, contiguous groups of ``w = d_mlp / G`` neurons, and group ``j`` of MLP ``l`` is the
node ``m{l}.n{j}``:

- **sender**: its neurons' share of the MLP output, ``post[..., group] @ W_out[group]``
  (``post`` is the activation the output projection reads). The output bias b_out belongs
  to no group, like b_O for heads, so the groups sum to the MLP output minus b_out.
- **receiver**: its own copy of the MLP's pre-norm input ``blocks.{l}.hook_mlp_in``, passed
  through its own copy of the MLP's norm and its own columns of W_in (and of the gate
  projection in gated MLPs, which splits the same neurons). The pre-activation the model
  goes on with is assembled from the copies, so the gradient on copy ``j`` is group ``j``'s
  path alone and the copies' gradients add up to the whole MLP's.

Both are computed from the weights at hook time, one einsum per layer, without changing
the model. The attribution, faithfulness and masking code sees a group sender like a head
(``[batch, pos, G, d_model]``) and a group receiver like a q/k/v input, via
`ctlens.bridge.hooks.sender_hooks` / `ctlens.bridge.hooks.receiver_hooks`. Summing
scores over a graph's groups (`coarsen_matrix`) lives with the graph in `ctlens.graph`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctlens.bridge.families import hf_component, projection_xw
from ctlens.bridge.names import HookLayout

Hook = tuple[str, Callable[..., Any]]


@dataclass(frozen=True)
class MLPParts:
    """One MLP's projections in ``x @ W`` orientation and its pre-MLP norm module."""

    w_in: Float[torch.Tensor, "d_model d_mlp"]
    b_in: Float[torch.Tensor, " d_mlp"] | None
    w_gate: Float[torch.Tensor, "d_model d_mlp"] | None
    b_gate: Float[torch.Tensor, " d_mlp"] | None
    w_out: Float[torch.Tensor, "d_mlp d_model"]
    norm: nn.Module


def mlp_parts(model: Any, layer: int) -> MLPParts:
    """The projections and norm of MLP ``layer`` of a `ctlens.load_model` bridge."""
    block = model.blocks[layer]
    mlp = block.mlp
    where = f"blocks[{layer}].mlp"
    w_in, b_in = projection_xw(getattr(mlp, "in"), f"{where}.in")
    w_gate = b_gate = None
    if hasattr(mlp, "gate"):
        w_gate, b_gate = projection_xw(mlp.gate, f"{where}.gate")
    w_out, _ = projection_xw(mlp.out, f"{where}.out")
    norm = hf_component(block.ln2, f"blocks[{layer}].ln2")
    return MLPParts(w_in, b_in, w_gate, b_gate, w_out, norm)


def group_outputs(
    post: Float[torch.Tensor, "batch pos d_mlp"],
    w_out: Float[torch.Tensor, "d_mlp d_model"],
    groups: int,
) -> Float[torch.Tensor, "batch pos groups d_model"]:
    """Each group's share of the MLP output (no b_out): ``post[..., g] @ W_out[g]``."""
    b, p, d_mlp = post.shape
    width = d_mlp // groups
    return torch.einsum(
        "bpgw,gwd->bpgd", post.reshape(b, p, groups, width), w_out.reshape(groups, width, -1)
    )


def group_linear(
    x: Float[torch.Tensor, "batch pos groups d_model"],
    weight: Float[torch.Tensor, "d_model d_mlp"],
    bias: torch.Tensor | None,
) -> Float[torch.Tensor, "batch pos d_mlp"]:
    """Group ``g``'s neurons of ``x[:, :, g] @ W + b``, concatenated over groups."""
    b, p, groups, d = x.shape
    width = weight.shape[1] // groups
    out = torch.einsum("bpgd,dgw->bpgw", x, weight.reshape(d, groups, width)).reshape(b, p, -1)
    return out if bias is None else out + bias


def sender_hook(
    model: Any, layer: int, groups: int, report: Callable[[torch.Tensor], None]
) -> Hook:
    """A forward hook that hands MLP ``layer``'s group outputs ``[b, p, G, d]`` to ``report``."""
    parts = mlp_parts(model, layer)

    def hook(post: torch.Tensor, hook: Any) -> None:
        report(group_outputs(post, parts.w_out, groups))

    return HookLayout.mlp_post(layer), hook


def receiver_hooks(
    model: Any,
    layer: int,
    groups: int,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> list[Hook]:
    """Hooks that give each group of MLP ``layer`` its own copy of the MLP input.

    At ``blocks.{l}.hook_mlp_in`` the input is repeated into ``[b, p, G, d]`` copies and
    passed through ``transform`` (which may patch or watch each copy); at the W_in (and gate)
    outputs the model's pre-activations are replaced by the copies' own, so group ``j``'s
    neurons read copy ``j`` only.
    """
    parts = mlp_parts(model, layer)
    projections = [(parts.w_in, parts.b_in)]
    if parts.w_gate is not None:
        projections.append((parts.w_gate, parts.b_gate))
    state: dict[str, tuple[torch.Tensor, ...]] = {}

    def pre_activations(copies: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normed = parts.norm(copies)
        return tuple(group_linear(normed, weight, bias) for weight, bias in projections)

    def read(x: torch.Tensor, hook: Any) -> None:
        copies = transform(x[:, :, None].repeat(1, 1, groups, 1))
        if torch.is_grad_enabled():
            # keep only the copies for the backward; the normed copies are recomputed
            state["pre"] = checkpoint(pre_activations, copies, use_reentrant=False)
        else:
            state["pre"] = pre_activations(copies)

    def project(index: int) -> Callable[..., torch.Tensor]:
        def hook(pre: torch.Tensor, hook: Any) -> torch.Tensor:
            return state["pre"][index].to(pre.dtype)

        return hook

    hooks: list[Hook] = [
        (HookLayout.mlp_in(layer), read),
        (HookLayout.mlp_projection_out(layer, "in"), project(0)),
    ]
    if parts.w_gate is not None:
        hooks.append((HookLayout.mlp_projection_out(layer, "gate"), project(1)))
    return hooks


def neuron_slice(group: int, groups: int, d_mlp: int) -> slice:
    """The neurons of group ``group`` out of ``groups`` in an MLP of width ``d_mlp``."""
    width = d_mlp // groups
    return slice(group * width, (group + 1) * width)
