"""Architectures and training recipes of the zoo models.

Each :class:`ModelSpec` fixes an HF architecture (``GPT2LMHeadModel`` or
``LlamaForCausalLM``), its config (dropout off, vocabulary = the task tokenizer's) and the
recipe that ``ctlens zoo train NAME`` runs by default. Changing a spec changes what a retrain
produces; the shipped weights record the recipe they came from in ``training.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ctlens.tasks.language import DEFAULT_MIXTURE, vocabulary
from ctlens.tasks.tokenizer import BOS, PAD

if TYPE_CHECKING:  # transformers loads when a model is built, so the specs stay light
    from transformers import GPT2Config, LlamaConfig, PreTrainedModel


class UnknownModelError(KeyError, ValueError):
    """Raised for a zoo name that does not exist; the message lists the available names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters (AdamW, linear warm-up then cosine decay to ``min_lr_ratio``)."""

    steps: int = 6000
    batch_size: int = 32
    context: int = 64
    lr: float = 2.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 500
    threads: int = 2  # torch CPU threads: float results, so the weights, depend on it
    mixture: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIXTURE))


@dataclass(frozen=True)
class ModelSpec:
    """A zoo model: its HF architecture, config arguments and default training recipe."""

    name: str
    architecture: str  # "gpt2" or "llama"
    config: Mapping[str, Any]
    recipe: Recipe
    description: str

    def hf_config(self) -> GPT2Config | LlamaConfig:
        """The HF config (vocabulary and special ids from the task tokenizer, no dropout)."""
        from transformers import GPT2Config, LlamaConfig

        vocab = vocabulary()
        common = {
            "vocab_size": len(vocab),
            "bos_token_id": vocab.index(BOS),
            "eos_token_id": vocab.index(BOS),
            "pad_token_id": vocab.index(PAD),
        }
        if self.architecture == "gpt2":
            return GPT2Config(
                **common, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **self.config
            )
        if self.architecture == "llama":
            return LlamaConfig(**common, attention_dropout=0.0, **self.config)
        raise ValueError(f"unknown architecture {self.architecture!r} (expected gpt2 or llama)")

    def build(self) -> PreTrainedModel:
        """A freshly initialised HF model (uses torch's global RNG; seed it first)."""
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

        config = self.hf_config()
        if isinstance(config, GPT2Config):
            return GPT2LMHeadModel(config)
        return LlamaForCausalLM(config)


ZOO_MIXTURE: Mapping[str, float] = MappingProxyType(
    {"agreement": 0.1, "ioi": 0.3, "pronoun": 0.1, "induction": 0.45, "filler": 0.05}
)
"""Training mixture of the zoo recipes: more repeated sequences and less filler than the
general corpus (``DEFAULT_MIXTURE``), so the induction circuit forms well within the
10-minute budget."""

SPECS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "tiny-llama": ModelSpec(
            name="tiny-llama",
            architecture="llama",
            config={
                "hidden_size": 128,
                "intermediate_size": 384,
                "num_hidden_layers": 3,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 16,
                "max_position_embeddings": 64,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            },
            recipe=Recipe(steps=5000, mixture=dict(ZOO_MIXTURE)),
            description="Llama-style: RMSNorm, rotary positions, SwiGLU MLP, grouped-query "
            "attention (8 query heads, 4 KV heads).",
        ),
        "tiny-gpt2": ModelSpec(
            name="tiny-gpt2",
            architecture="gpt2",
            config={
                "n_embd": 128,
                "n_layer": 3,
                "n_head": 8,
                "n_positions": 64,
                "n_inner": 256,
                "layer_norm_epsilon": 1e-5,
            },
            recipe=Recipe(steps=6000, mixture=dict(ZOO_MIXTURE)),
            description="GPT-2-style: LayerNorm, learned absolute positions, GELU MLP, "
            "tied embeddings.",
        ),
        "mini-gpt2": ModelSpec(
            name="mini-gpt2",
            architecture="gpt2",
            config={
                "n_embd": 128,
                "n_layer": 6,
                "n_head": 8,
                "n_positions": 64,
                "n_inner": 512,
                "layer_norm_epsilon": 1e-5,
            },
            recipe=Recipe(steps=5000, mixture=dict(ZOO_MIXTURE)),
            description="GPT-2 small's proportions: 6 layers of 8 heads, GELU MLP of 4 x "
            "d_model holding two thirds of the non-embedding parameters, tied embeddings.",
        ),
    }
)
"""All zoo model specs by name."""


def spec(name: str) -> ModelSpec:
    """The spec of a zoo model; unknown names raise :class:`UnknownModelError`."""
    try:
        return SPECS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown zoo model {name!r}; available: {', '.join(sorted(SPECS))}"
        ) from None
