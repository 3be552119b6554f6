"""Loading models as TransformerLens 4 bridges with the hooks ctlens needs.

`load_model` accepts a zoo name (``"zoo:tiny-gpt2"``), a local HuggingFace model directory,
an HF ``nn.Module`` or a hub name, and returns a `TransformerBridge` that

- runs in *compatibility mode without weight processing*: hook names and pre-norm hook
  semantics of TransformerLens, logits equal to the HF module's, parameters left in HF
  coordinates (what fine-tuning and saving need);
- fires the per-head hooks the edge graph reads: ``attn.hook_result`` (per-head outputs),
  ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` (per-head residual inputs) and
  ``hook_mlp_in``;
- is in eval mode, on the requested device and dtype.

Architectures whose edges cannot be scored exactly are refused with the reason: post-norm
blocks (the residual stream is normalised after each sum, so a receiver's input is not the
sum of sender outputs) and blocks that normalise a component's output before adding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ZOO_PREFIX = "zoo:"

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
REFUSED = {
    "BertForMaskedLM": "post-norm blocks: the residual stream is normalised after every sum",
    "OPTForCausalLM": "OPT-350m applies LayerNorm after the residual sum (post-norm) and "
    "projects the embedding; its receiver inputs are not a plain sum of sender outputs",
    "Gemma2ForCausalLM": "Gemma 2 normalises attention and MLP outputs before adding them to "
    "the residual stream, so a receiver's input is not the sum of sender outputs",
    "Gemma3ForCausalLM": "Gemma 3 normalises attention and MLP outputs before adding them to "
    "the residual stream, so a receiver's input is not the sum of sender outputs",
    "T5ForConditionalGeneration": "encoder-decoder models have no single residual stream",
    "GPTJForCausalLM": "TransformerLens 4.3's GPT-J bridge raises NotImplementedError for "
    "set_use_attn_result and set_use_split_qkv_input, so per-head outputs and per-head "
    "q/k/v inputs (the graph's senders and receivers) cannot be hooked",
}


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be analysed exactly by ctlens; the message says why."""


def load_model(
    source: str | Path | nn.Module,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any | None = None,
) -> Any:
    """Load a model as a hooked `TransformerBridge` ready for attribution and tuning.

    Args:
        source: ``"zoo:NAME"`` (a model shipped with ctlens, see `ctlens.zoo.names`), a
            local HuggingFace model directory, an HF ``PreTrainedModel`` instance, or a hub
            name such as ``"gpt2"`` (needs network access).
        device: where to put the model (default: CPU).
        dtype: parameter dtype, e.g. ``torch.bfloat16`` or ``"float16"`` (default: keep).
        tokenizer: a tokenizer to attach (default: the one shipped with the model).

    Returns:
        A `TransformerBridge` in eval mode with ctlens's hooks enabled.
    """
    torch_dtype = _parse_dtype(dtype)
    if isinstance(source, nn.Module):
        return _wrap(source, tokenizer, device, torch_dtype)
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"load_model takes a zoo name, a directory, an HF module or a hub name; "
            f"got {type(source).__name__}"
        )
    text = str(source)
    if text.startswith(ZOO_PREFIX):
        from ctlens.zoo import load_hf

        module, zoo_tokenizer = load_hf(text[len(ZOO_PREFIX) :])
        return _wrap(module, tokenizer or zoo_tokenizer, device, torch_dtype, name=text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _wrap(*_load_directory(path, tokenizer), device, torch_dtype, name=str(path))
    if path.suffix or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{text!r} is not a model directory; pass a directory holding config.json and "
            "weights, a zoo name like 'zoo:tiny-gpt2', or a hub name like 'gpt2'"
        )
    return _boot_hub(text, device, torch_dtype, tokenizer)


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return value


def _architecture(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    names = getattr(config, "architectures", None) or []
    return names[0] if names else type(module).__name__


def check_architecture(module: nn.Module) -> str:
    """Return the HF architecture name, or raise `UnsupportedModelError` with the reason."""
    arch = _architecture(module)
    if arch in REFUSED:
        raise UnsupportedModelError(f"{arch} cannot be analysed exactly: {REFUSED[arch]}")
    if arch not in SUPPORTED:
        known = ", ".join(sorted(SUPPORTED))
        raise UnsupportedModelError(
            f"{arch} is not supported: ctlens needs a pre-norm decoder whose residual stream "
            f"is a plain sum of component outputs and whose bridge exposes split q/k/v "
            f"inputs. Supported architectures: {known}"
        )
    return arch


def _load_directory(path: Path, tokenizer: Any | None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no config.json; is it a HuggingFace model directory?"
        )
    module = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    return module, tokenizer


def _boot_hub(
    name: str, device: str | torch.device | None, dtype: torch.dtype | None, tokenizer: Any
) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(
            name, device=device, dtype=dtype or torch.float32, tokenizer=tokenizer
        )
    except OSError as err:
        raise OSError(
            f"could not load {name!r} from the HuggingFace Hub ({err}). Offline? Use a zoo "
            "model ('zoo:tiny-gpt2'), a local directory, or an HF module you built."
        ) from err
    check_architecture(bridge.original_model)
    return _configure(bridge)


def _wrap(
    module: nn.Module,
    tokenizer: Any | None,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    name: str = "external",
) -> Any:
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    arch = check_architecture(module)
    module.eval()
    if dtype is not None:
        module.to(dtype)
    if device is not None:
        module.to(device)
    bridge = build_bridge_from_module(
        module, arch, hf_config=module.config, tokenizer=tokenizer, model_name=name
    )
    return _configure(bridge)


def _configure(bridge: Any) -> Any:
    """Switch on the hooks ctlens reads and check that they fire."""
    bridge.enable_compatibility_mode(no_processing=True)
    try:
        bridge.set_use_attn_result(True)
        bridge.set_use_split_qkv_input(True)
        bridge.set_use_hook_mlp_in(True)
    except (NotImplementedError, ValueError) as err:
        arch = _architecture(bridge.original_model)
        raise UnsupportedModelError(
            f"{arch} cannot be analysed exactly: its TransformerLens bridge cannot expose "
            f"per-head outputs and split q/k/v inputs ({err})"
        ) from err
    bridge.eval()
    required = ("blocks.0.attn.hook_result", "blocks.0.hook_q_input", "blocks.0.hook_k_input")
    missing = [h for h in required if h not in bridge.hook_dict]
    if missing:
        raise UnsupportedModelError(
            f"this bridge does not expose {missing}: ctlens needs per-head outputs and split "
            "q/k/v inputs to score edges exactly"
        )
    return bridge


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
    if _architecture(getattr(model, "original_model", model)) != "GPTNeoXForCausalLM":
        return []
    if not hasattr(model, "blocks"):
        return []
    copies = []
    for block in model.blocks:
        attn = block.attn
        fused = attn.qkv.original_component
        parts = [getattr(attn, n).original_component for n in ("q", "k", "v")]
        for name in ("weight", "bias"):
            whole = getattr(fused, name, None)
            if isinstance(whole, nn.Parameter):
                pieces = tuple(getattr(p, name) for p in parts)
                copies.append(SplitCopy(whole, pieces, int(model.cfg.n_heads)))
    return copies
