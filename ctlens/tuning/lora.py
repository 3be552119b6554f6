"""The LoRA baseline: peft adapters on every attention and MLP projection, no circuit.

peft is an optional extra (``pip install ctlens[lora]``). LoRA trains a plain copy of the HF
module (the bridge's hooks are not needed: there is no circuit). At every evaluation the
merged weights ``W0 + scale * B A`` are mirrored into the bridge, so evaluation, circuit
snapshots, the parameters-moved count and the export run on the bridge like every other mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ctlens.tuning.weights import hf_state_dict, plain_hf_copy

_PREFIX = "base_model.model."


def _require_peft() -> Any:
    try:
        import peft
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "mode='lora' needs peft: pip install 'ctlens[lora]' (or pip install peft)"
        ) from None
    return peft


def target_modules(module: nn.Module) -> list[str]:
    """Leaf names of every attention/MLP projection (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, Conv1D)) and "lm_head" not in name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


class LoraBackend:
    """A peft-wrapped copy of the bridge's HF module, trained instead of the bridge."""

    def __init__(self, model: Any, rank: int, alpha: float) -> None:
        peft = _require_peft()
        module = plain_hf_copy(model)
        targets = target_modules(module)
        self.fan_in_fan_out = type(module).__name__.startswith("GPT2")
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=targets,
            fan_in_fan_out=self.fan_in_fan_out,
            bias="none",
        )
        self.model = peft.get_peft_model(module, config)
        self.model.eval()
        self.bridge = model

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits

    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter parameters, in a fixed order."""
        return [p for _, p in self.model.named_parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)

    @torch.no_grad()
    def mirror(self) -> None:
        """Write the merged weights ``W0 + delta`` into the bridge (in HF names)."""
        from peft.tuners.lora import LoraLayer

        live = hf_state_dict(self.bridge)
        for name, layer in self.model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            key = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
            base = layer.get_base_layer().weight
            delta = layer.get_delta_weight("default")
            live[f"{key}.weight"].copy_(base + delta.to(base.dtype))
