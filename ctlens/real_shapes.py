"""The shapes of real hub models, written into the package, built on the meta device.

The memory planner, the scaling docs and tests that need a real model's *shape* (not its
weights) use these configurations. The values are those of each model's public
``config.json`` (architecture fields only: sizes, head counts, vocabulary, tying, norms,
positional settings); nothing is downloaded. :func:`build` instantiates the HF module on
the meta device, so even Llama-3.1-8B costs no memory and no time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load in `build`: `ctlens plan` checks names first
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class RealShape:
    """A hub model's architecture: its HF class names and the config values that fix its shape."""

    name: str  # short name used by ctlens (``ctlens plan --shape NAME``)
    hub_id: str  # the model's hub id, for the reader's reference only (never fetched)
    architecture: str  # the HF ``*ForCausalLM`` class
    config_class: str  # the HF config class
    config: Mapping[str, Any]
    params: float  # the published parameter count (rounded), checked by the tests

    def hf_config(self) -> PretrainedConfig:
        """The HF config object for this shape."""
        import transformers

        return getattr(transformers, self.config_class)(**dict(self.config))


def _shape(
    name: str, hub_id: str, architecture: str, config_class: str, params: float, **config: Any
) -> RealShape:
    return RealShape(name, hub_id, architecture, config_class, MappingProxyType(config), params)


_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: Mapping[str, RealShape] = MappingProxyType({
    s.name: s
    for s in (
        _shape(
            "gpt2", "openai-community/gpt2", "GPT2LMHeadModel", "GPT2Config", 124e6,
            vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
            n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            tie_word_embeddings=True,
        ),
        _shape(
            "pythia-160m", "EleutherAI/pythia-160m", "GPTNeoXForCausalLM", "GPTNeoXConfig", 162e6,
            vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
            max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True,
            tie_word_embeddings=False,
        ),
        _shape(
            "pythia-1b", "EleutherAI/pythia-1b", "GPTNeoXForCausalLM", "GPTNeoXConfig", 1.01e9,
            vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
            intermediate_size=8192, hidden_act="gelu", rotary_pct=0.25, rotary_emb_base=10000,
            max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True,
            tie_word_embeddings=False,
        ),
        _shape(
            "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Qwen2ForCausalLM", "Qwen2Config", 494e6,
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, hidden_act="silu",
            max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
            tie_word_embeddings=True, use_sliding_window=False,
        ),
        _shape(
            "gemma-2-2b", "google/gemma-2-2b", "Gemma2ForCausalLM", "Gemma2Config", 2.61e9,
            vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
            rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256,
            sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        ),
        _shape(
            "llama-3.2-1b", "meta-llama/Llama-3.2-1B", "LlamaForCausalLM", "LlamaConfig", 1.24e9,
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
            max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True,
        ),
        _shape(
            "llama-3.1-8b", "meta-llama/Llama-3.1-8B", "LlamaForCausalLM", "LlamaConfig", 8.03e9,
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
            max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False,
        ),
        _shape(
            "olmo-2-1b", "allenai/OLMo-2-0425-1B", "Olmo2ForCausalLM", "Olmo2Config", 1.48e9,
            vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=16, num_key_value_heads=16, hidden_act="silu",
            max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
    )
})


class UnknownShapeError(KeyError, ValueError):
    """Raised for a shape name that :data:`SHAPES` does not hold; the message lists them."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def names() -> list[str]:
    """The known shape names, in the order above (smallest family first)."""
    return list(SHAPES)


def shape(name: str) -> RealShape:
    """The :class:`RealShape` called ``name`` (case-insensitive; the hub id also works)."""
    key = name.lower()
    for s in SHAPES.values():
        if key in (s.name, s.hub_id.lower()):
            return s
    raise UnknownShapeError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")


def build(name: str | RealShape, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The HF module of ``name`` on the meta device: real shapes, no storage, no weights.

    ``dtype`` defaults to float32. Use it to count parameters or plan memory; it cannot run
    a forward pass with data.
    """
    import torch
    import transformers

    s = shape(name) if isinstance(name, str) else name
    with torch.device("meta"):
        module = getattr(transformers, s.architecture)(s.hf_config())
    return module.to(dtype or torch.float32)


def count_parameters(module: torch.nn.Module) -> int:
    """Distinct parameters of ``module`` (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
