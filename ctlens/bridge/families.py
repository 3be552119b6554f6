"""What each model family exposes to ctlens: the architecture tables and the fused weights.

- The tables: `SUPPORTED` (checked end to end), `FROZEN_NORM` (analysable under the
  frozen-norm linearisation, by opt-in), `REFUSED` (with the reason),
  `HALF_PRECISION_FAILS`, and the hooks every loaded bridge must fire (`REQUIRED_HOOKS`,
  `FROZEN_NORM_HOOKS`). `ctlens.model` loads and checks models against them.
- `approximation`: the approximation a loaded bridge carries (None: exact).
- The HF modules behind the bridge's components: `hf_component` (the one reader of a
  component's ``original_component``) and `output_axis` (``nn.Linear`` holds
  ``[out, in]``, transformers' GPT-2 ``Conv1D`` ``[in, out]``), with `projection_xw`
  (a projection as ``y = x W + b``).
- Fused q/k/v: GPT-2's ``c_attn`` whose q/k/v parameters the bridge holds as *views*
  (`FusedQKV`, `fused_layers`, `fused_parameter_ids`), and GPT-NeoX's ``query_key_value``
  whose parts it holds as *copies* (`SplitCopy`, `split_copies`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Architectures checked end to end (tests/test_families.py: logits, receiver gradients against
# finite differences on the HF module, EAP against exact patching, gradient restriction,
# export back to HF).
SUPPORTED = {
    "GPT2LMHeadModel": "GPT-2",
    "LlamaForCausalLM": "Llama 2/3.x (grouped-query attention)",
    "MistralForCausalLM": "Mistral (grouped-query attention)",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5 (q/k/v biases)",
    "Qwen3ForCausalLM": "Qwen3 (per-head q/k norms)",
    "GPTNeoXForCausalLM": "GPT-NeoX / Pythia (parallel attention + MLP, partial rotary)",
    "Phi3ForCausalLM": "Phi-3 (fused qkv and fused gate/up projections)",
    "OlmoForCausalLM": "OLMo (non-parametric LayerNorm)",
}
# Architectures whose sublayer outputs are normalised before they join the residual stream:
# analysable only under the frozen-norm linearisation (docs/attribution.md), by opt-in.
FROZEN_NORM = {
    "Gemma2ForCausalLM": "Gemma 2",
    "Gemma3ForCausalLM": "Gemma 3 (text)",
    "Olmo2ForCausalLM": "OLMo-2",
}
APPROXIMATIONS = ("frozen-norm",)
_NORMALISED_OUTPUTS = (
    "normalises attention and MLP outputs before adding them to the residual stream, so a "
    "receiver's input is not the sum of sender outputs. Pass "
    "load_model(..., approximate='frozen-norm') to analyse it under the frozen-norm "
    "linearisation (each head's share of its layer's normalised output; docs/attribution.md)"
)
REFUSED = {
    "BertForMaskedLM": "post-norm blocks: the residual stream is normalised after every sum",
    "OPTForCausalLM": "OPT-350m applies LayerNorm after the residual sum (post-norm) and "
    "projects the embedding; its receiver inputs are not a plain sum of sender outputs",
    "T5ForConditionalGeneration": "encoder-decoder models have no single residual stream",
    "GPTJForCausalLM": "TransformerLens 4.3's GPT-J bridge raises NotImplementedError for "
    "set_use_attn_result and set_use_split_qkv_input, so per-head outputs and per-head "
    "q/k/v inputs (the graph's senders and receivers) cannot be hooked",
    **{arch: f"{name} {_NORMALISED_OUTPUTS}" for arch, name in FROZEN_NORM.items()},
}
# TransformerLens 4.3's bridges of these fail in half precision (their attention multiplies
# float32 weights with bfloat16 / float16 values); ctlens says so and how to load them.
HALF_PRECISION_FAILS = {"OlmoForCausalLM", "Olmo2ForCausalLM"}
# The hooks the graph reads (`ctlens.bridge.hooks`), checked on every loaded bridge.
REQUIRED_HOOKS = (
    "hook_embed",
    "blocks.0.attn.hook_result",
    "blocks.0.hook_q_input",
    "blocks.0.hook_k_input",
    "blocks.0.hook_v_input",
    "blocks.0.hook_mlp_in",
    "blocks.0.hook_mlp_out",
    "ln_final.hook_in",
)
FROZEN_NORM_HOOKS = (
    "blocks.0.ln1_post.hook_scale",
    "blocks.0.ln1_post.hook_out",
    "blocks.0.ln2_post.hook_out",
)


def architecture(module: nn.Module) -> str:
    """The HF architecture name of ``module`` (its config's first ``architectures`` entry)."""
    config = getattr(module, "config", None)
    names = getattr(config, "architectures", None) or []
    return names[0] if names else type(module).__name__


def approximation(model: Any) -> str | None:
    """The approximation a `load_model` bridge was loaded under (None: exact)."""
    return getattr(model, "_ctlens_approximate", None)


@dataclass(frozen=True)
class SplitCopy:
    """A fused HF parameter that the bridge split into separate q/k/v *copies*.

    GPT-NeoX stores q, k and v interleaved per head in one ``query_key_value`` weight
    (``[heads, 3, d_head, ...]``); TransformerLens 4.3 copies the three parts into separate
    ``attn.q/k/v`` parameters, which the forward pass and the gradients use. The fused HF
    parameter is then stale: `gather` writes the copies back into it (before saving or
    exporting HF weights) and `scatter` reads it into the copies (after loading HF weights).
    GPT-2's and Phi-3's fused weights need none of this: their parts are views.
    """

    fused: nn.Parameter
    parts: tuple[nn.Parameter, ...]
    n_heads: int

    def _fused_parts(self) -> list[torch.Tensor]:
        shaped = self.fused.detach().view(self.n_heads, len(self.parts), -1, *self.fused.shape[1:])
        return [shaped[:, i] for i in range(len(self.parts))]

    @torch.no_grad()
    def gather(self) -> None:
        """Copy the parts into the fused parameter."""
        for target, part in zip(self._fused_parts(), self.parts, strict=True):
            target.copy_(part.detach().view_as(target))

    @torch.no_grad()
    def scatter(self) -> None:
        """Copy the fused parameter into the parts."""
        for source, part in zip(self._fused_parts(), self.parts, strict=True):
            part.copy_(source.reshape(part.shape))


def split_copies(model: Any) -> list[SplitCopy]:
    """Every fused HF parameter of ``model`` whose parts the bridge holds as copies.

    Empty for plain HF modules and for families whose fused parameters are viewed, not
    copied. See `SplitCopy`.
    """
    if architecture(getattr(model, "original_model", model)) != "GPTNeoXForCausalLM":
        return []
    if not hasattr(model, "blocks"):
        return []
    copies = []
    for block in model.blocks:
        attn = block.attn
        fused = hf_component(attn.qkv, "attn.qkv")
        parts = [hf_component(getattr(attn, n), f"attn.{n}") for n in ("q", "k", "v")]
        for name in ("weight", "bias"):
            whole = getattr(fused, name, None)
            if isinstance(whole, nn.Parameter):
                pieces = tuple(getattr(p, name) for p in parts)
                copies.append(SplitCopy(whole, pieces, int(model.cfg.n_heads)))
    return copies


def hf_component(component: Any, where: str) -> nn.Module:
    """The HF module a bridge component (``model.blocks[0].attn.q``, ``model.embed``, ...)
    wraps: its ``original_component``. ``where`` names the component in the error."""
    module = getattr(component, "original_component", None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{where} exposes no original_component; is this a ctlens bridge?")
    return module


def output_axis(module: nn.Module, where: str) -> int:
    """The axis of ``module.weight`` that indexes its outputs: 0 for ``nn.Linear``
    (``[out, in]``), 1 for transformers' ``Conv1D`` (GPT-2's ``[in, out]``); any other
    module is refused, naming ``where``."""
    if isinstance(module, nn.Linear):
        return 0
    if type(module).__name__ == "Conv1D":
        return 1
    raise ValueError(
        f"{where} is a {type(module).__name__}; ctlens reads nn.Linear and transformers' "
        "Conv1D weights only"
    )


def projection_xw(
    component: Any, where: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of a bridge component's projection with ``W`` as ``[d_in, d_out]``
    (``y = x W + b``): the weight itself for ``Conv1D``, its transpose (a view) for
    ``nn.Linear``."""
    module = hf_component(component, where)
    weight = module.weight
    return (weight.T if output_axis(module, where) == 0 else weight), module.bias


FUSED_PARAMETER_NAMES = ("weight", "bias")
"""The parameters of a fused projection module, in the order files list them."""


@dataclass(frozen=True)
class FusedQKV:
    """One attention layer's fused HF projection (``c_attn``) and the bridge's q/k/v parts."""

    fused: nn.Module
    parts: tuple[nn.Module, nn.Module, nn.Module]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def fused_layers(model: Any) -> list[FusedQKV]:
    """Every attention of ``model`` whose q/k/v weights are views of a fused parameter
    (GPT-2's ``c_attn``); empty for other families and for plain HF modules."""
    layers = []
    for block in getattr(model, "blocks", ()):
        attn = getattr(block, "attn", None)
        names = ("qkv", "q", "k", "v")
        if attn is None or not all(hasattr(attn, n) for n in names):
            continue
        fused, q, k, v = (hf_component(getattr(attn, n), f"attn.{n}") for n in names)
        whole = getattr(fused, "weight", None)
        if isinstance(whole, nn.Parameter) and _storage(q.weight) == _storage(whole):
            layers.append(FusedQKV(fused, (q, k, v)))
    return layers


def fused_parameter_ids(model: Any) -> set[int]:
    """``id`` of every fused parameter (``c_attn`` weight and bias) that `unfuse` removes."""
    return {id(p) for layer in fused_layers(model) for name in FUSED_PARAMETER_NAMES
            if isinstance(p := getattr(layer.fused, name, None), nn.Parameter)}
