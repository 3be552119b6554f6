"""Pretraining / general corpus: packed rows of sentences from a mixture of families.

Each row starts with ``<bos>`` and is filled, up to the context length, with segments of one
family drawn from the mixture (e.g. several IOI sentences, or several repeated random
sequences); the last segment is truncated at the context edge. The held-out ``general``
corpus is the same distribution drawn from a separate (independent) seed stream.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch
from jaxtyping import Int

from ctlens.tasks.language import (
    ALL_OCCUPATIONS,
    DEFAULT_MIXTURE,
    agreement_example,
    filler_sentence,
    induction_sequence,
    ioi_example,
    pronoun_example,
)
from ctlens.tasks.tokenizer import BOS, PAD, encode_words, word_to_id

FAMILIES: tuple[str, ...] = ("agreement", "ioi", "pronoun", "induction", "filler")

GENERAL_SEED_OFFSET = 1_000_003
"""Added to a seed to draw held-out general text from a stream separate from training."""


def segment(family: str, rng: random.Random) -> list[str]:
    """One segment (a sentence, or a repeated random sequence) of a family."""
    if family == "agreement":
        return agreement_example(rng).sentence()
    if family == "pronoun":
        return pronoun_example(rng, occupation=rng.choice(ALL_OCCUPATIONS)).sentence()
    if family == "ioi":
        return ioi_example(rng).sentence()
    if family == "induction":
        half = induction_sequence(rng, rng.randint(4, 24))
        return half + half
    if family == "filler":
        return filler_sentence(rng)
    raise ValueError(f"unknown corpus family {family!r}; known: {', '.join(FAMILIES)}")


def sample_rows(
    rng: random.Random,
    n: int,
    context: int,
    mixture: Mapping[str, float] = DEFAULT_MIXTURE,
) -> Int[torch.Tensor, "n context"]:
    """``n`` packed rows of ``context`` token ids (``<bos>`` first, right-padded with pad).

    Rows are full in practice (segments are packed and the last one truncated); pad only
    appears if a family produced nothing, and callers should still mask pad in the loss.
    """
    unknown = set(mixture) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown mixture families {sorted(unknown)}; known: {FAMILIES}")
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    families = list(mixture)
    weights = [mixture[f] for f in families]
    table = word_to_id()
    out = torch.full((n, context), table[PAD], dtype=torch.long)
    for i in range(n):
        family = rng.choices(families, weights)[0]
        ids = [table[BOS]]
        while len(ids) < context:
            ids += encode_words(segment(family, rng))
        out[i] = torch.tensor(ids[:context])
    return out


def general_rows(n: int, context: int = 64, seed: int = 0) -> Int[torch.Tensor, "n context"]:
    """Held-out general corpus (the pretraining mixture, from a separate seed stream)."""
    return sample_rows(random.Random(seed + GENERAL_SEED_OFFSET), n, context)
