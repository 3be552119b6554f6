"""ctlens's own tiny pretrained models, trained on the synthetic task language.

The HuggingFace Hub is not always reachable, and exploring a circuit should take seconds, so
ctlens ships small models with real circuits (agreement, IOI, stereotyped pronouns,
induction) trained by :mod:`ctlens.zoo.train`. Each lives in ``ctlens/zoo/models/NAME/``
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``training.json``) and loads
with no network::

    model, tok = ctlens.zoo.load_hf("tiny-llama")   # plain HF module, eval mode
    bridge = ctlens.load_model("zoo:tiny-llama")    # the same, wrapped in a TransformerBridge

Models: ``tiny-llama`` (RMSNorm, rotary, SwiGLU, grouped-query attention), ``tiny-gpt2``
(LayerNorm, learned positions) and ``mini-gpt2`` (GPT-2 small's proportions: 6 layers of 8
heads, MLPs of 4 x d_model holding two thirds of the non-embedding parameters); model cards
in ``docs/zoo/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ctlens.tasks.tokenizer import wrap
from ctlens.zoo.configs import SPECS, ModelSpec, UnknownModelError, spec

if TYPE_CHECKING:  # transformers loads with the first model, so `ctlens zoo list` stays light
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

MODELS_DIR: Path = Path(__file__).with_name("models")

__all__ = [
    "SPECS",
    "ModelSpec",
    "UnknownModelError",
    "load_hf",
    "model_dir",
    "names",
    "spec",
    "tokenizer",
    "training_record",
]


def names() -> list[str]:
    """Names of the shipped zoo models (those with weights in the package), sorted."""
    return sorted(n for n in SPECS if (MODELS_DIR / n / "model.safetensors").is_file())


def model_dir(name: str) -> Path:
    """The shipped directory of a zoo model; unknown or untrained names raise
    :class:`UnknownModelError` listing the available models."""
    if name not in names():
        hint = (
            f" (it has a spec but no shipped weights: run `ctlens zoo train {name}`)"
            if name in SPECS
            else ""
        )
        raise UnknownModelError(
            f"unknown zoo model {name!r}{hint}; available: {', '.join(names()) or 'none'}"
        )
    return MODELS_DIR / name


def tokenizer(name: str | None = None) -> PreTrainedTokenizerFast:
    """The zoo tokenizer (all zoo models share the task language's tokenizer).

    With ``name``, the copy shipped inside that model's directory.
    """
    if name is None:
        from ctlens.tasks.tokenizer import tokenizer as task_tokenizer

        return task_tokenizer()
    return wrap(model_dir(name) / "tokenizer.json")


def load_hf(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a shipped zoo model as a plain HF module (eval mode, no dropout) and its tokenizer.

    Reads only the package's files (no network). The module is ``GPT2LMHeadModel`` or
    ``LlamaForCausalLM`` according to the model's ``config.json``.
    """
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    classes: dict[str, type[PreTrainedModel]] = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}
    path = model_dir(name)
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    cls = classes.get(model_type)
    if cls is None:
        raise ValueError(f"{path}/config.json has unsupported model_type {model_type!r}")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a few local tensors: a bar would only break lines
    try:
        model = cls.from_pretrained(path, local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer(name)


def training_record(name: str) -> dict:
    """The shipped ``training.json`` of a zoo model (recipe, loss, accuracies, wall time)."""
    return json.loads((model_dir(name) / "training.json").read_text())
