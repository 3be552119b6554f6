"""Seeded generators that turn language samples into padded tensor batches.

Each generator returns a :class:`PromptBatch` of plain tensors (the same fields as
``ctlens.TaskData``), deterministic in ``(n, seed, stream)``: the same arguments always give
the same batch, and each (task, stream) pair -- ``discovery``, ``train``, ``eval`` -- draws
from its own seed stream, so those samples are independent. Prompts start with
``<bos>`` and are right-padded with ``<pad>``; ``positions`` index the last prompt token,
whose logits predict the answer.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from jaxtyping import Bool, Int

from ctlens.tasks.language import (
    FEMALE_OCCUPATIONS,
    MALE_OCCUPATIONS,
    Example,
    agreement_example,
    induction_sequence,
    ioi_example,
    pronoun_example,
)
from ctlens.tasks.tokenizer import BOS, PAD, encode_words, word_to_id

SPANS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "agreement": ("subject", "attractor", "end", "other"),
    "pronoun": ("occupation", "end", "other"),
    "ioi": ("io", "s1", "s2", "end", "other"),
    "induction": ("first", "second", "other"),
})
"""The token spans of each task family (positional circuits, `ctlens.spans`): the words'
roles (`Example.roles`; induction: the two copies), ``end`` the last prompt token, where the
answer is predicted (it wins over a role), and ``other`` the rest (``<bos>``, fillers)."""


@dataclass(frozen=True)
class PromptBatch:
    """Tensors of one task sample, laid out exactly as ``ctlens.TaskData`` expects.

    ``positions``/``correct``/``wrong`` are ``[n]`` for single-answer tasks and ``[n, P]``
    for induction (``wrong`` is None there; the metric is the log-probability). ``groups``
    names a per-example property (occupation, subject number) for grouped evaluations.
    ``spans`` labels each token with its span, an index into ``span_names`` (`SPANS`;
    -1 on padding).
    """

    clean: Int[torch.Tensor, "n seq"]
    corrupt: Int[torch.Tensor, "n seq"]
    attention_mask: Bool[torch.Tensor, "n seq"]
    positions: Int[torch.Tensor, " n *p"]
    correct: Int[torch.Tensor, " n *p"]
    wrong: Int[torch.Tensor, " n *p"] | None
    metric: str
    groups: tuple[str, ...] = ()
    spans: Int[torch.Tensor, "n seq"] | None = None
    span_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.clean.shape[0])


def task_rng(name: str, seed: int) -> random.Random:
    """An RNG for ``(task name, seed)``; names get independent streams (stable across runs)."""
    return random.Random(zlib.crc32(name.encode()) * 1_000_003 + seed)


def pad_rows(
    rows: Sequence[Sequence[int]],
) -> tuple[Int[torch.Tensor, "n seq"], Bool[torch.Tensor, "n seq"]]:
    """Right-pad id lists with ``<pad>``; returns ids and the bool attention mask."""
    width = max(len(r) for r in rows)
    pad = word_to_id()[PAD]
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def span_rows(
    examples: Sequence[Example], names: tuple[str, ...], end: bool = True
) -> list[list[int]]:
    """Per example, the span label of ``<bos>`` and each prompt word (`SPANS` ``names``):
    its role, ``end`` for the last word (unless ``end=False``), else ``other``."""
    index = {name: k for k, name in enumerate(names)}
    rows = []
    for e in examples:
        roles = [*(e.roles or ("",) * len(e.prompt))]
        if end:
            roles[-1] = "end"
        rows.append([index["other"], *(index[r or "other"] for r in roles)])
    return rows


def batch_from_examples(
    examples: Sequence[Example], span_names: tuple[str, ...], metric: str = "logit_diff"
) -> PromptBatch:
    """Encode examples (``<bos>`` + prompt) into a right-padded :class:`PromptBatch`."""
    if not examples:
        raise ValueError("need at least one example to build a batch")
    bos = word_to_id()[BOS]
    clean_rows = [[bos, *encode_words(e.prompt)] for e in examples]
    corrupt_rows = [[bos, *encode_words(e.corrupt)] for e in examples]
    for i, (c, k) in enumerate(zip(clean_rows, corrupt_rows, strict=True)):
        if len(c) != len(k):
            raise ValueError(f"example {i}: clean and corrupt prompts differ in length")
    clean, mask = pad_rows(clean_rows)
    corrupt, _ = pad_rows(corrupt_rows)
    return PromptBatch(
        clean=clean,
        corrupt=corrupt,
        attention_mask=mask,
        positions=mask.sum(dim=1) - 1,
        correct=torch.tensor(encode_words([e.answer for e in examples])),
        wrong=torch.tensor(encode_words([e.wrong for e in examples])),
        metric=metric,
        groups=tuple(e.group for e in examples),
        spans=pad_labels(span_rows(examples, span_names)),
        span_names=span_names,
    )


def pad_labels(rows: Sequence[Sequence[int]]) -> Int[torch.Tensor, "n seq"]:
    """Right-pad span label lists with -1 (no span)."""
    labels = torch.full((len(rows), max(len(r) for r in rows)), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return labels


def examples(
    task: str,
    n: int,
    seed: int = 0,
    stream: str = "eval",
    occupations: Sequence[str] | None = None,
    she_rate: float | None = None,
) -> list[Example]:
    """``n`` examples of ``agreement``, ``pronoun`` or ``ioi`` from the ``(task, stream, seed)``
    RNG stream (``stream`` separates discovery, training and evaluation samples).

    Pronoun examples cycle through ``occupations`` (default: the 12 stereotyped ones) so each
    gets about ``n/12`` prompts; ``she_rate`` sets the training pronoun's probability.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of examples, got {n}")
    rng = task_rng(f"{task}/{stream}", seed)
    if task == "agreement":
        return [agreement_example(rng) for _ in range(n)]
    if task == "ioi":
        return [ioi_example(rng) for _ in range(n)]
    if task == "pronoun":
        occs = (
            list(occupations)
            if occupations is not None
            else [
                *FEMALE_OCCUPATIONS,
                *MALE_OCCUPATIONS,
            ]
        )
        return [pronoun_example(rng, occs[i % len(occs)], she_rate) for i in range(n)]
    raise ValueError(f"no example generator for {task!r}; known: agreement, pronoun, ioi")


def agreement(n: int, seed: int = 0, stream: str = "eval") -> PromptBatch:
    """Subject-verb agreement pairs; corrupt flips the subject's number."""
    return batch_from_examples(examples("agreement", n, seed, stream), SPANS["agreement"])


def pronoun(n: int, seed: int = 0, stream: str = "eval") -> PromptBatch:
    """Pronoun prompts cycling through the 12 stereotyped occupations.

    Answer ``she``, wrong ``he`` for every example (metric: she - he logit difference);
    ``groups`` holds each example's occupation.
    """
    return batch_from_examples(examples("pronoun", n, seed, stream), SPANS["pronoun"])


def ioi(n: int, seed: int = 0, stream: str = "eval") -> PromptBatch:
    """Indirect-object identification; answer IO, wrong S; corrupt replaces S by a 3rd name."""
    return batch_from_examples(examples("ioi", n, seed, stream), SPANS["ioi"])


def induction(n: int, seed: int = 0, stream: str = "eval", length: int = 12) -> PromptBatch:
    """Repeated random sequences ``<bos> x x`` scored at the second copy (metric: logprob).

    ``positions[b] = L+1 .. 2L-1`` (the second copy's tokens except the last) and
    ``correct[b, i]`` is the token that follows, which repeats the first copy. The corrupt
    row replaces the *first* copy with fresh words and keeps the second, so its second half
    repeats nothing, while the tokens at the scored positions are the same as in the clean
    row: every clean/corrupt difference lies in the earlier occurrence, which is what the
    previous-token head -> induction head (key) path reads.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of examples, got {n}")
    if length < 2:
        raise ValueError(f"induction length must be >= 2 to have a scored position, got {length}")
    rng = task_rng(f"induction/{stream}", seed)
    bos = word_to_id()[BOS]
    clean_rows: list[list[int]] = []
    corrupt_rows: list[list[int]] = []
    for _ in range(n):
        first = induction_sequence(rng, 2 * length)
        half, other = first[:length], first[length:]
        clean_rows.append([bos, *encode_words(half + half)])
        corrupt_rows.append([bos, *encode_words(other + half)])
    clean, mask = pad_rows(clean_rows)
    corrupt, _ = pad_rows(corrupt_rows)
    positions = torch.arange(length + 1, 2 * length).expand(n, -1).clone()
    first, second, other = range(3)  # SPANS["induction"]
    spans = torch.tensor([other] + [first] * length + [second] * length).expand(n, -1).clone()
    return PromptBatch(
        clean=clean,
        corrupt=corrupt,
        attention_mask=mask,
        positions=positions,
        correct=clean.gather(1, positions + 1),
        wrong=None,
        metric="logprob",
        spans=spans,
        span_names=SPANS["induction"],
    )


GENERATORS: Mapping[str, Callable[..., PromptBatch]] = MappingProxyType(
    {"agreement": agreement, "pronoun": pronoun, "ioi": ioi, "induction": induction}
)
"""The task batch generators by name (``generator(n, seed, stream)``)."""
