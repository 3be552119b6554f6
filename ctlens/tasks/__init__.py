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

from ctlens.tasks.bundle import DESCRIPTIONS, Task, load, load_jsonl, names, to_taskdata
from ctlens.tasks.generators import PromptBatch
from ctlens.tasks.language import vocabulary
from ctlens.tasks.tokenizer import TOKENIZER_PATH, tokenizer

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
