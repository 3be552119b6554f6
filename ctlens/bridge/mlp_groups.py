"""MLP neuron groups ("MLP heads"): the hooks that make each group a sender and a receiver.

With ``Graph.from_model(model, mlp_groups=G)`` each MLP's ``d_mlp`` neurons are split into G
equal, contiguous groups of ``w = d_mlp / G`` neurons, and group ``j`` of MLP ``l`` is the
node ``m{l}.n{j}``:

- **sender**: its neurons' share of the MLP output, ``post[..., group] @ W_out[group]``
  (``post`` is the activation the output projection reads). The output bias b_out belongs
  to no group, like b_O for heads, so the groups sum to the MLP output minus b_out.
- **receiver**: the MLP's pre-norm input ``blocks.{l}.hook_mlp_in`` as group ``j``'s neurons
  read it: through the MLP's norm and group ``j``'s columns of W_in (and of the gate
  projection in gated MLPs, which splits the same neurons). The gradient on it is group
  ``j``'s path alone; the groups' gradients add up to the whole MLP's.

No group gets a ``d_model``-wide copy of anything it shares with the others. A sender can be
reported whole (`sender_hook`, ``[batch, pos, G, d_model]``, for code that reads every
group's output) or as the hidden activation it is a slice of (``post``, ``d_mlp`` per token,
for the EAP kernel, which expands groups only when a product needs them: `group_rows`). A
receiver hook (`receiver_hooks`) lets the MLP read one input and patches the
pre-activations of only those groups that are given inputs of their own (`GroupedInput`:
ablating or patching some group edges). Gradients (`gradient_hooks`) are taken on the
pre-activations, ``d_mlp`` per token, and turned into the groups' input gradients a chunk
of groups at a time during the backward. All of it is computed from the weights at hook
time without changing the model. Summing scores over a graph's groups (`coarsen_matrix`)
lives with the graph in `ctlens.graph`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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


def group_rows(
    hidden: Float[torch.Tensor, "batch pos d_mlp"],
    w_out: Float[torch.Tensor, "d_mlp d_model"],
    groups: int,
    select: slice | None = None,
    out: torch.Tensor | None = None,
) -> Float[torch.Tensor, "sel batch pos d_model"]:
    """Group outputs of ``hidden`` as rows, group-major: ``hidden[..., g] @ W_out[g]`` for
    the groups ``select`` (default all), in fp32 (into ``out`` if given, a contiguous fp32
    tensor of that many elements: the EAP kernel reuses one, since a fresh allocation of
    this size costs about as much as the product on a CPU).

    One batched product per call, the cost of the slice of the MLP's output projection the
    groups cover; what the EAP kernel expands a layer's groups with."""
    b, p, d_mlp = hidden.shape
    width = d_mlp // groups
    select = select or slice(0, groups)
    acts = hidden.reshape(b * p, groups, width)[:, select].transpose(0, 1).float()
    weights = w_out.reshape(groups, width, -1)[select].float()
    if out is None:
        return torch.bmm(acts, weights).view(-1, b, p, w_out.shape[1])
    torch.bmm(acts, weights, out=out.view(acts.shape[0], b * p, -1))
    return out.view(-1, b, p, w_out.shape[1])


def sender_hook(
    model: Any, layer: int, groups: int, report: Callable[[torch.Tensor], None]
) -> Hook:
    """A forward hook that hands MLP ``layer``'s group outputs ``[b, p, G, d]`` to ``report``."""
    parts = mlp_parts(model, layer)

    def hook(post: torch.Tensor, hook: Any) -> None:
        report(group_outputs(post, parts.w_out, groups))

    return HookLayout.mlp_post(layer), hook


@dataclass(frozen=True)
class GroupedInput:
    """What a grouped MLP's neuron groups read: ``base`` for every group, except the groups
    ``index`` (``[S]``), which read ``inputs[:, :, k]`` (``[batch, pos, S, d_model]``)."""

    base: Float[torch.Tensor, "batch pos d_model"]
    index: torch.Tensor | None = None
    inputs: Float[torch.Tensor, "batch pos S d_model"] | None = None


def _selected_linear(
    x: Float[torch.Tensor, "batch pos S d_model"],
    weight: Float[torch.Tensor, "d_model d_mlp"],
    bias: torch.Tensor | None,
    index: torch.Tensor,
    groups: int,
) -> Float[torch.Tensor, "batch pos S width"]:
    """Group ``index[k]``'s neurons of ``x[:, :, k] @ W + b`` (only the selected groups)."""
    chosen = weight.unflatten(1, (groups, -1)).index_select(1, index)  # [d, S, w]
    out = torch.einsum("bpsd,dsw->bpsw", x, chosen)
    return out if bias is None else out + bias.view(groups, -1).index_select(0, index)


def receiver_hooks(
    model: Any,
    layer: int,
    groups: int,
    transform: Callable[[torch.Tensor], torch.Tensor | GroupedInput],
) -> list[Hook]:
    """Hooks through which ``transform`` sets what MLP ``layer``'s neuron groups read.

    At ``blocks.{l}.hook_mlp_in`` the (fresh) input goes through ``transform``. A tensor, or
    a `GroupedInput`'s ``base``, is what the MLP reads, so every group not listed computes
    its pre-activations as the model does; a listed group's own input goes through the
    MLP's norm and its columns of W_in (and gate), and its neurons' pre-activations replace
    the model's at the projections' outputs. Only the listed groups cost a ``d_model``-wide
    input each.
    """
    parts = mlp_parts(model, layer)
    projections = [(parts.w_in, parts.b_in)]
    if parts.w_gate is not None:
        projections.append((parts.w_gate, parts.b_gate))
    state: dict[str, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def own_pre(inputs: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normed = parts.norm(inputs)
        return tuple(_selected_linear(normed, w, b, index, groups) for w, b in projections)

    def read(x: torch.Tensor, hook: Any) -> torch.Tensor:
        state.pop("own", None)
        given = transform(x)
        if isinstance(given, torch.Tensor):
            return given
        if given.index is not None and len(given.index):
            assert given.inputs is not None
            if torch.is_grad_enabled():
                # keep only the groups' inputs for the backward; their norms are recomputed
                own = checkpoint(own_pre, given.inputs, given.index, use_reentrant=False)
            else:
                own = own_pre(given.inputs, given.index)
            state["own"] = (given.index, own)
        return given.base

    def project(position: int) -> Callable[..., torch.Tensor | None]:
        def hook(pre: torch.Tensor, hook: Any) -> torch.Tensor | None:
            if "own" not in state:
                return None
            index, own = state["own"]
            values = own[position].to(pre.dtype)
            return pre.unflatten(-1, (groups, -1)).index_copy(2, index, values).flatten(-2)

        return hook

    return _input_and_projection_hooks(layer, parts, read, project)


GradientCallback = Callable[[slice, Callable[[torch.Tensor], None]], None]
"""``fn(groups, fill)``: ``fill(out)`` writes the groups' input gradients into ``out``
(``[len(groups), batch, pos, d_model]``, group-major, any float dtype)."""

Watch = Callable[[torch.Tensor, Callable[[torch.Tensor], None]], None]
"""``fn(tensor, hook)``: registers ``hook`` as a gradient hook on ``tensor`` (the caller keeps
the handle and the tensor)."""

# Norms whose input gradient `_norm_backward_` computes in closed form (the rest go through
# autograd, `norm_backward`): HF's RMSNorms of this form compute ``w * x / rms(x)``.
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


def _input_and_projection_hooks(
    layer: int, parts: MLPParts, read: Callable[..., Any],
    project: Callable[[int], Callable[..., Any]],
) -> list[Hook]:
    """``read`` at the layer's MLP input, ``project(0)`` at its input projection's output and,
    on a gated MLP, ``project(1)`` at the gate projection's output."""
    hooks: list[Hook] = [
        (HookLayout.mlp_in(layer), read),
        (HookLayout.mlp_projection_out(layer, "in"), project(0)),
    ]
    if parts.w_gate is not None:
        hooks.append((HookLayout.mlp_projection_out(layer, "gate"), project(1)))
    return hooks


def norm_backward(
    norm: nn.Module,
    x: Float[torch.Tensor, "batch pos d_model"],
    cotangents: Float[torch.Tensor, "n batch pos d_model"],
) -> Float[torch.Tensor, "n batch pos d_model"]:
    """``J_norm(x)^T u`` for each ``u`` of ``cotangents``: the gradients on the norm's input
    that the gradients ``u`` on its output give (autograd, for any norm)."""
    with torch.enable_grad():
        _, vjp = torch.func.vjp(norm, x.detach())
        (grad,) = torch.func.vmap(vjp)(cotangents)
    return grad.detach()


def _norm_backward_(
    norm: nn.Module, x: torch.Tensor, out: Float[torch.Tensor, "n batch pos d_model"]
) -> None:
    """`norm_backward` in place on ``out``, in closed form for LayerNorm and RMSNorm:
    ``J^T u = (v - [mean(v)] - x_hat * mean(v * x_hat)) / s`` with ``v = w * u``, ``x_hat``
    the normalised input and ``s`` its scale (the bracket only for LayerNorm)."""
    layer = isinstance(norm, nn.LayerNorm)
    if not layer and type(norm).__name__ not in _RMS_NORMS:
        out.copy_(norm_backward(norm, x, out))
        return
    xf = x.detach().to(out.dtype)
    if layer:
        xf = xf - xf.mean(-1, keepdim=True)
    eps = norm.eps if layer else norm.variance_epsilon
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = xf * rstd
    if norm.weight is not None:
        out.mul_(norm.weight.detach().to(out.dtype))
    dot = torch.einsum("nbpd,bpd->nbp", out, x_hat) / x.shape[-1]
    if layer:
        out.sub_(out.mean(-1, keepdim=True))
    out.addcmul_(x_hat[None], dot[..., None], value=-1.0)
    out.mul_(rstd[None])


def gradient_hooks(
    model: Any,
    layer: int,
    groups: int,
    watch: Watch,
    on_gradient: GradientCallback,
    chunk: int,
) -> list[Hook]:
    """Hooks that hand MLP ``layer``'s group input gradients to ``on_gradient``, ``chunk``
    groups at a time, during the backward.

    The gradient on group ``j``'s input is ``J_norm(x)^T (dpre[g_j] W_in[:, g_j]^T +
    dgate[g_j] W_gate[:, g_j]^T)``: ``dpre`` and ``dgate`` are the gradients on the W_in and
    gate outputs (``d_mlp`` per token, caught by ``watch``ed hooks) and ``x`` the MLP's
    pre-norm input. The callback decides where a chunk's ``d_model``-wide gradients are
    written, so no more than one chunk of them need exist besides what it keeps.
    """
    parts = mlp_parts(model, layer)
    weights = [parts.w_in] if parts.w_gate is None else [parts.w_in, parts.w_gate]
    current: dict[str, dict[str, Any]] = {}

    def read(x: torch.Tensor, hook: Any) -> None:
        # one record per forward, shared by its W_in and gate hooks
        current["pending"] = {"x": x.detach(), "grads": [None] * len(weights)}

    def arrive(position: int, pending: dict[str, Any], grad: torch.Tensor) -> None:
        pending["grads"][position] = grad
        if any(g is None for g in pending["grads"]):
            return
        grads, pending["grads"] = pending["grads"], [None] * len(weights)
        for start in range(0, groups, chunk):
            select = slice(start, min(start + chunk, groups))
            on_gradient(select, partial(_fill_group_grads, parts.norm, pending["x"], grads,
                                        weights, groups, select))

    def project(position: int) -> Callable[..., None]:
        def hook(pre: torch.Tensor, hook: Any) -> None:
            if pre.requires_grad:
                pending = current["pending"]
                watch(pre, lambda grad: arrive(position, pending, grad))

        return hook

    return _input_and_projection_hooks(layer, parts, read, project)


def _fill_group_grads(
    norm: nn.Module,
    x: torch.Tensor,
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    groups: int,
    select: slice,
    out: Float[torch.Tensor, "sel batch pos d_model"],
) -> None:
    """Write ``J_norm(x)^T sum_i grads_i[..., g] @ weights_i[:, g]^T`` for the groups
    ``select`` into ``out``: computed in ``out`` when its dtype is the model's, else in the
    model's dtype (fp32 for a half-precision model) and copied."""
    dtype = grads[0].dtype
    if dtype.itemsize < 4:
        dtype = torch.float32
    target = out if out.dtype == dtype else torch.empty(out.shape, dtype=dtype, device=out.device)
    flat_target = target.view(target.shape[0], -1, x.shape[-1])  # [S, T, d]
    for i, (grad, weight) in enumerate(zip(grads, weights, strict=True)):
        b, p, _ = grad.shape
        rows = grad.reshape(b * p, groups, -1)[:, select].transpose(0, 1).to(dtype)  # [S, T, w]
        cols = weight.unflatten(1, (groups, -1))[:, select].permute(1, 2, 0).to(dtype)  # [S, w, d]
        if i == 0:
            torch.bmm(rows, cols, out=flat_target)
        else:
            flat_target.baddbmm_(rows, cols)
    _norm_backward_(norm, x, target)
    if target is not out:
        out.copy_(target)


def neuron_slice(group: int, groups: int, d_mlp: int) -> slice:
    """The neurons of group ``group`` out of ``groups`` in an MLP of width ``d_mlp``."""
    width = d_mlp // groups
    return slice(group * width, (group + 1) * width)
