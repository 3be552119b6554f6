"""Synthetic tasks of ctlens: a word-level English-like language, its tokenizer, generators.

The language (:mod:`ctlens.tasks.language`) has one sentence family per mechanism --
subject-verb ``agreement`` across attractors, stereotyped ``pronoun`` choice after
occupations, indirect object identification (``ioi``), ``induction`` on repeated random
sequences -- plus filler sentences; the ``general`` corpus mixes them all. Words are whole
tokens of the shipped WordLevel tokenizer (:func:`tokenizer`; ``<bos>`` prepended, ``<pad>``
for right padding, no leading-space tokens). Every generator is seeded and deterministic.

``load(name, n=..., seed=...)`` returns a :class:`Task` (discovery data, training rows with a
target mask, evaluation sets, held-out general corpus) for the built-in tasks
(:func:`names`), including the fine-tuning targets ``agreement-flip`` (produce the wrong verb
number) and ``pronoun-debias`` (she and he equally likely), or for a user's JSONL file::

    task = ctlens.tasks.load("agreement-flip", n=128, seed=0)
    mine = ctlens.tasks.load("my_task.jsonl", tokenizer=ctlens.zoo.tokenizer())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctlens._lazy import lazy_exports

# The language and the tokenizer module are light (no torch, transformers loads on first
# use) and are imported now: the function `tokenizer` shares its name with its module, so it
# must be bound here, after the module, or the module would shadow it. The rest, which
# needs torch, loads on first use.
from ctlens.tasks.language import vocabulary
from ctlens.tasks.tokenizer import TOKENIZER_PATH, tokenizer

if TYPE_CHECKING:  # what the lazy table serves, for type checkers and the API docs
    from ctlens.tasks.bundle import Task, load, load_jsonl, to_taskdata
    from ctlens.tasks.catalog import DESCRIPTIONS, names
    from ctlens.tasks.generators import PromptBatch

_EXPORTS: dict[str, str] = {
    "DESCRIPTIONS": "ctlens.tasks.catalog",
    "PromptBatch": "ctlens.tasks.generators",
    "Task": "ctlens.tasks.bundle",
    "load": "ctlens.tasks.bundle",
    "load_jsonl": "ctlens.tasks.bundle",
    "names": "ctlens.tasks.catalog",
    "to_taskdata": "ctlens.tasks.bundle",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "DESCRIPTIONS",
    "TOKENIZER_PATH",
    "PromptBatch",
    "Task",
    "load",
    "load_jsonl",
    "names",
    "to_taskdata",
    "tokenizer",
    "vocabulary",
]
