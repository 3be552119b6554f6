"""GPT-2's fused q/k/v under FSDP2: own storage while sharded, the fused layout for files.

TransformerLens 4.3's bridge splits GPT-2's fused ``c_attn`` Conv1D (weight
``[d_model, 3 * d_model]``, bias ``[3 * d_model]``) into three ``nn.Linear`` modules whose
parameters are *views* of it: ``q.weight = c_attn.weight[:, :d].T`` (non-contiguous),
``q.bias = c_attn.bias[:d]``, and likewise k and v. The bridge's attention
(``JointQKVAttentionBridge._split_forward_qkv``) computes q, k and v from those three
modules only; HF's own ``GPT2Attention.forward``, the only reader of ``c_attn``, never runs.
FSDP2's ``fully_shard`` refuses non-contiguous parameters, and would shard ``c_attn`` as a
fourth, duplicate copy.

`unfuse` therefore gives the q/k/v parameters their own contiguous storage (same shapes,
same values) and unregisters ``c_attn``'s weight and bias, so FSDP shards exactly the
parameters the forward uses and each real weight once. `refused` (entered by
`ctlens.tuning.parallel.sharding.Sharding.gathered` once every parameter is whole) rebuilds the
bridge's own layout for its duration -- a fused ``c_attn`` parameter with q/k/v views into
it -- so the weight mapping (`ctlens.tuning.weights`), checkpoints, export, real-parameter
counts and the gradient rules see the model exactly as an unsharded run does.

The optimizer of an unsharded run lists ``c_attn``'s (gradient-less, stateless) parameters;
a sharded one does not. `UnfusedQKV.to_fused_order` and `UnfusedQKV.from_fused_order`
renumber an optimizer state between the two, so checkpoints keep one layout and a sharded
run resumes unsharded and the other way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ctlens.bridge.families import (
    FUSED_PARAMETER_NAMES,
    FusedQKV,
    fused_layers,
    fused_parameter_ids,
)


@dataclass(frozen=True)
class UnfusedQKV:
    """What `unfuse` changed: the layers, and where the fused parameters sat in the
    optimizer's parameter list of an unsharded run (``slots``, ascending)."""

    layers: tuple[FusedQKV, ...]
    slots: tuple[int, ...]
    has_bias: tuple[bool, ...]

    def to_fused_order(self, saved: dict[str, Any]) -> dict[str, Any]:
        """An optimizer ``state_dict`` over the unfused parameters, renumbered as an
        unsharded run's (the fused parameters' slots inserted, without state)."""
        if not self.slots:
            return saved
        groups = _one_group(saved)
        total = len(groups[0]["params"]) + len(self.slots)
        index = [j for j in range(total) if j not in set(self.slots)]
        state = {index[int(i)]: s for i, s in saved["state"].items()}
        return {"state": state, "param_groups": [{**groups[0], "params": list(range(total))}]}

    def from_fused_order(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The inverse of `to_fused_order`: an unsharded run's optimizer ``state_dict``
        renumbered for the unfused parameters."""
        if not self.slots:
            return saved
        groups = _one_group(saved)
        total = len(groups[0]["params"])
        slots = set(self.slots)
        carried = sorted(i for i in saved["state"] if int(i) in slots and saved["state"][i])
        if carried:
            raise ValueError(
                f"the saved optimizer state holds state for the fused c_attn parameters "
                f"(slots {carried}), which never receive gradients in a ctlens run; this "
                "optimizer state was not written by CircuitTuner"
            )
        index = {j: n for n, j in enumerate(j for j in range(total) if j not in slots)}
        state = {index[int(i)]: s for i, s in saved["state"].items() if int(i) not in slots}
        params = list(range(total - len(slots)))
        return {"state": state, "param_groups": [{**groups[0], "params": params}]}


def _one_group(saved: dict[str, Any]) -> list[dict[str, Any]]:
    groups = saved["param_groups"]
    if len(groups) != 1:
        raise ValueError(
            f"expected an optimizer with one parameter group (CircuitTuner's), got {len(groups)}"
        )
    return groups


@torch.no_grad()
def unfuse(model: Any) -> UnfusedQKV:
    """Give ``model``'s q/k/v parameters their own contiguous storage and unregister the
    fused ones (in place; see the module docstring). A no-op for models without views."""
    layers = tuple(fused_layers(model))
    removed = fused_parameter_ids(model)
    listed = [p for p in model.parameters() if p.requires_grad]
    slots = tuple(i for i, p in enumerate(listed) if id(p) in removed)
    has_bias = []
    for layer in layers:
        for part in layer.parts:
            for name in FUSED_PARAMETER_NAMES:
                p = getattr(part, name, None)
                if isinstance(p, nn.Parameter):
                    own = p.detach().clone(memory_format=torch.contiguous_format)
                    setattr(part, name, nn.Parameter(own, requires_grad=p.requires_grad))
        has_bias.append(isinstance(getattr(layer.fused, "bias", None), nn.Parameter))
        for name in FUSED_PARAMETER_NAMES:
            layer.fused.register_parameter(name, None)
    return UnfusedQKV(layers, slots, tuple(has_bias))


@contextlib.contextmanager
def refused(unfused: UnfusedQKV) -> Iterator[None]:
    """Inside: the bridge's fused layout again, built from the current q/k/v values (a
    fused ``c_attn`` parameter, q/k/v parameters viewing it). For reading only: on exit the
    unfused parameters are put back as they were, and writes made inside are dropped."""
    kept: list[list[tuple[nn.Module, str, nn.Parameter]]] = []
    try:
        for layer, bias in zip(unfused.layers, unfused.has_bias, strict=True):
            kept.append([(part, name, getattr(part, name)) for part in layer.parts
                         for name in FUSED_PARAMETER_NAMES[: 1 + bias]])
            _fuse(layer, bias)
        yield
    finally:
        for layer, own in zip(unfused.layers, kept, strict=False):
            for part, name, p in own:
                setattr(part, name, p)
            for name in FUSED_PARAMETER_NAMES:
                layer.fused.register_parameter(name, None)


@torch.no_grad()
def _fuse(layer: FusedQKV, bias: bool) -> None:
    """Register ``layer``'s fused parameters from its parts and make the parts views, as
    the bridge does (``JointQKVAttentionBridge._default_split_qkv_matrix``)."""
    parts = layer.parts
    grad = parts[0].weight.requires_grad
    width = parts[0].weight.shape[0]
    weight = torch.cat([p.weight.detach().T for p in parts], dim=1)
    layer.fused.weight = nn.Parameter(weight, requires_grad=grad)
    for i, part in enumerate(parts):
        part.weight = nn.Parameter(weight[:, i * width:(i + 1) * width].T, requires_grad=grad)
    if bias:
        whole = torch.cat([p.bias.detach() for p in parts])
        layer.fused.bias = nn.Parameter(whole, requires_grad=grad)
        for i, part in enumerate(parts):
            part.bias = nn.Parameter(whole[i * width:(i + 1) * width], requires_grad=grad)
