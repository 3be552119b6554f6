"""The :class:`Task` bundle: discovery data, training data and evaluation sets of one task.

``ctlens.tasks.load(name, n=..., seed=...)`` builds a task from the synthetic language
(:func:`names` lists them), or from a user's JSONL file
(``load("my_task.jsonl", tokenizer=tok)``, fields ``prompt``, ``corrupt_prompt``,
``answer``, ``wrong_answer``). Everything is a deterministic function of ``(name, n, seed)``;
discovery, training and evaluation samples come from separate seed streams.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int

from ctlens.data import TaskData
from ctlens.spans import OTHER, PADDING
from ctlens.tasks import generators
from ctlens.tasks.catalog import DESCRIPTIONS, names
from ctlens.tasks.corpus import general_rows
from ctlens.tasks.language import Example
from ctlens.tasks.tokenizer import BOS, encode_words, word_to_id

Objective = Literal["maximize", "zero"]


@dataclass(frozen=True)
class Task:
    """Everything circuit-tuning needs for one task.

    Attributes:
        name: task name (``"agreement-flip"``) or the JSONL file's stem.
        description: one or two sentences: what the task asks of the model.
        discovery: clean/corrupt pairs and the metric used to find the circuit.
        train_tokens: ``[n, seq]`` right-padded token ids (``<bos>`` first) to fine-tune on.
        train_target_mask: ``[n, seq]``, True at the *tokens* the LM loss trains on; the loss
            at token ``t`` uses the logits at ``t - 1`` (so column 0 is always False).
        train_attention_mask: ``[n, seq]``, True on real (non-padding) tokens.
        train_data: the training rows as a :class:`TaskData` (metric read where the targets
            are predicted; ``corrupt`` is None), for discovery on the training batch.
        evals: evaluation sets by name: the target metric under ``target_eval`` plus the
            other tasks' metrics, each on held-out samples.
        target_eval: the key of ``evals`` holding the fine-tuning target's metric.
        objective: ``"maximize"`` (the target metric should rise) or ``"zero"`` (it should
            reach 0, e.g. she - he for ``pronoun-debias``).
        general_tokens: ``[m, context]`` held-out general-corpus rows for the LM loss that
            measures general capability (None for a JSONL task with a foreign tokenizer).
        general_attention_mask: ``[m, context]`` real-token mask of ``general_tokens``.
    """

    name: str
    description: str
    discovery: TaskData
    train_tokens: Int[torch.Tensor, "n seq"]
    train_target_mask: Bool[torch.Tensor, "n seq"]
    train_attention_mask: Bool[torch.Tensor, "n seq"]
    train_data: TaskData | None
    evals: Mapping[str, TaskData]
    target_eval: str
    objective: Objective = "maximize"
    general_tokens: Int[torch.Tensor, "m ctx"] | None = None
    general_attention_mask: Bool[torch.Tensor, "m ctx"] | None = None

    def __post_init__(self) -> None:
        shape = self.train_tokens.shape
        for field in ("train_target_mask", "train_attention_mask"):
            if getattr(self, field).shape != shape:
                raise ValueError(
                    f"{field} has shape {tuple(getattr(self, field).shape)}, "
                    f"expected {tuple(shape)} like train_tokens"
                )
        if self.target_eval not in self.evals:
            raise ValueError(
                f"target_eval {self.target_eval!r} is not one of the evals {list(self.evals)}"
            )
        if self.objective not in ("maximize", "zero"):
            raise ValueError(f"objective must be 'maximize' or 'zero', got {self.objective!r}")
        object.__setattr__(self, "evals", MappingProxyType(dict(self.evals)))


EVAL_TASKS: tuple[str, ...] = ("agreement", "ioi", "pronoun", "induction")


def to_taskdata(batch: generators.PromptBatch, flip: bool = False) -> TaskData:
    """A :class:`TaskData` from a generator batch (``flip`` swaps correct and wrong)."""
    correct, wrong = batch.correct, batch.wrong
    if flip:
        if wrong is None:
            raise ValueError("cannot flip a batch without wrong answers")
        correct, wrong = wrong, correct
    return TaskData(
        clean=batch.clean,
        corrupt=batch.corrupt,
        correct=correct,
        wrong=wrong,
        positions=batch.positions,
        attention_mask=batch.attention_mask,
        metric=batch.metric,
        spans=batch.spans,
        span_names=batch.span_names,
    )


def _training_rows(
    examples: list[Example], span_names: tuple[str, ...], flip: bool = False
) -> tuple[
    Int[torch.Tensor, "n seq"], Bool[torch.Tensor, "n seq"], Bool[torch.Tensor, "n seq"], TaskData
]:
    """``<bos> prompt target`` rows; the target is ``next_word()`` (or ``wrong`` if ``flip``).

    The prompt's tokens carry its spans (`generators.SPANS`); the target token, read by no
    metric, goes to ``other``.
    """
    bos = word_to_id()[BOS]
    rows, targets, contrasts = [], [], []
    for e in examples:
        target = e.wrong if flip else e.next_word()
        contrast = e.answer if flip or target == e.wrong else e.wrong
        rows.append([bos, *encode_words(e.prompt), *encode_words([target])])
        targets.append(encode_words([target])[0])
        contrasts.append(encode_words([contrast])[0])
    tokens, attention = generators.pad_rows(rows)
    other = span_names.index("other")
    spans = [[*r, other] for r in generators.span_rows(examples, span_names)]
    last = attention.sum(1) - 1
    target_mask = torch.zeros_like(attention)
    target_mask[torch.arange(len(rows)), last] = True
    data = TaskData(
        clean=tokens,
        correct=torch.tensor(targets),
        wrong=torch.tensor(contrasts),
        positions=last - 1,
        attention_mask=attention,
        spans=generators.pad_labels(spans),
        span_names=span_names,
    )
    return tokens, target_mask, attention, data


def _eval_sets(n: int, seed: int) -> dict[str, TaskData]:
    """Held-out evaluation sets of the four task metrics."""
    return {name: to_taskdata(generators.GENERATORS[name](n, seed, "eval")) for name in EVAL_TASKS}


def load(
    name: str,
    n: int = 256,
    seed: int = 0,
    n_train: int = 1024,
    n_general: int = 128,
    context: int = 64,
    tokenizer: Any | None = None,
) -> Task:
    """Build a :class:`Task` by name, or from a JSONL file path (then ``tokenizer`` is needed).

    ``n`` examples for discovery and for each evaluation set, ``n_train`` training rows,
    ``n_general`` general-corpus rows of ``context`` tokens.
    """
    if name.endswith(".jsonl") or Path(name).suffix == ".jsonl":
        return load_jsonl(name, tokenizer, n_general=n_general, context=context, seed=seed)
    if name not in DESCRIPTIONS:
        raise ValueError(
            f"unknown task {name!r}; built-in tasks: {', '.join(names())} "
            "(or pass a path ending in .jsonl with tokenizer=...)"
        )
    if tokenizer is not None and not _is_ctlens_tokenizer(tokenizer):
        raise ValueError(
            f"built-in task {name!r} is written in ctlens's word-level vocabulary, but the "
            "given tokenizer has another one; use a zoo model (ctlens.load_model('zoo:...')) "
            "or drop tokenizer= (it is only needed for JSONL files)"
        )
    for label, value in (("n", n), ("n_train", n_train), ("n_general", n_general)):
        if value < 1:
            raise ValueError(f"{label} must be positive, got {value}")
    evals = _eval_sets(n, seed)
    general = general_rows(n_general, context, seed)
    general_mask = torch.ones_like(general, dtype=torch.bool)
    objective: Objective = "maximize"
    base = name.split("-")[0]

    if base in ("agreement", "ioi", "pronoun"):
        flip = name == "agreement-flip"
        discovery = to_taskdata(generators.GENERATORS[base](n, seed, "discovery"), flip=flip)
        she_rate = 0.5 if name == "pronoun-debias" else None
        train_examples = (
            generators.examples(base, n_train, seed, "train", she_rate=she_rate)
            if base == "pronoun"
            else generators.examples(base, n_train, seed, "train")
        )
        tokens, target_mask, attention, train_data = _training_rows(
            train_examples, generators.SPANS[base], flip=flip
        )
        if flip:
            evals[name] = to_taskdata(generators.agreement(n, seed, "eval"), flip=True)
        if name == "pronoun-debias":
            evals[name] = evals["pronoun"]
            objective = "zero"
        target_eval = name
    elif name == "induction":
        discovery = to_taskdata(generators.induction(n, seed, "discovery"))
        batch = generators.induction(n_train, seed, "train")
        tokens, attention = batch.clean, batch.attention_mask
        target_mask = torch.zeros_like(attention)
        target_mask.scatter_(1, batch.positions + 1, True)
        train_data = to_taskdata(batch)
        target_eval = name
    else:  # general
        disc_tokens = general_rows(n, context, seed + 7919)
        discovery = _next_token_data(disc_tokens)
        tokens = general_rows(n_train, context, seed + 104729)
        attention = torch.ones_like(tokens, dtype=torch.bool)
        target_mask = attention.clone()
        target_mask[:, 0] = False
        train_data = _next_token_data(tokens)
        evals["general"] = _next_token_data(general)
        target_eval = "general"
    return Task(
        name=name,
        description=DESCRIPTIONS[name],
        discovery=discovery,
        train_tokens=tokens,
        train_target_mask=target_mask,
        train_attention_mask=attention,
        train_data=train_data,
        evals=evals,
        target_eval=target_eval,
        objective=objective,
        general_tokens=general,
        general_attention_mask=general_mask,
    )


def _next_token_data(tokens: Int[torch.Tensor, "n ctx"]) -> TaskData:
    """Full rows scored on the log-probability of every next token (no corrupt).

    Corpus text has no roles shared across rows, so its spans are the token positions
    (`TaskData.with_position_spans`; every row has the same length).
    """
    n, ctx = tokens.shape
    positions = torch.arange(ctx - 1).expand(n, -1).clone()
    return TaskData(
        clean=tokens, correct=tokens[:, 1:].clone(), positions=positions, metric="logprob"
    ).with_position_spans()


def load_jsonl(
    path: str | Path,
    tokenizer: Any | None,
    n_general: int = 128,
    context: int = 64,
    seed: int = 0,
) -> Task:
    """A user's task from JSONL (``prompt``, ``corrupt_prompt``, ``answer``, ``wrong_answer``).

    The same examples serve discovery, training (prompt + answer, target = the answer) and
    the target evaluation. With the zoo tokenizer, the built-in evaluation sets and the
    general corpus are attached too. Errors name the offending line: a missing field, an
    answer that is not one token, a clean/corrupt length mismatch, or a word the zoo
    tokenizer does not know.
    """
    path = Path(path)
    if tokenizer is None:
        raise ValueError(
            f"loading {path} needs a tokenizer: ctlens.tasks.load({str(path)!r}, "
            "tokenizer=tok) (the zoo's is ctlens.zoo.tokenizer())"
        )
    data = TaskData.from_jsonl(path, tokenizer)
    _check_unknown_words(path, tokenizer, data)
    ctlens_vocab = _is_ctlens_tokenizer(tokenizer)
    assert data.attention_mask is not None and data.correct is not None
    # training rows: the prompt followed by its answer, the answer being the only target
    lengths = data.attention_mask.sum(1)
    rows = torch.arange(len(data))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(data), int(lengths.max()) + 1), pad, dtype=torch.long)
    tokens[:, : data.clean.shape[1]] = torch.where(data.attention_mask, data.clean, pad)
    tokens[rows, lengths] = data.correct
    attention = torch.arange(tokens.shape[1])[None, :] <= lengths[:, None]
    target_mask = torch.zeros_like(attention)
    target_mask[rows, lengths] = True
    spans = None
    if data.spans is not None and data.span_names is not None:
        # the prompt's tokens keep their spans; the answer, read by no metric, is "other"
        spans = torch.full(tokens.shape, PADDING, dtype=torch.long)
        spans[:, : data.spans.shape[1]] = data.spans
        spans[rows, lengths] = data.span_names.index(OTHER)
    train_data = TaskData(
        clean=tokens,
        correct=data.correct,
        wrong=data.wrong,
        positions=data.positions,
        attention_mask=attention,
        metric=data.metric,
        spans=spans,
        span_names=None if spans is None else data.span_names,
    )
    evals: dict[str, TaskData] = {path.stem: data}
    general = general_mask = None
    if ctlens_vocab:
        evals.update(_eval_sets(256, seed))
        evals[path.stem] = data
        general = general_rows(n_general, context, seed)
        general_mask = torch.ones_like(general, dtype=torch.bool)
    return Task(
        name=path.stem,
        description=f"User task from {path.name} ({len(data)} examples).",
        discovery=data,
        train_tokens=tokens,
        train_target_mask=target_mask,
        train_attention_mask=attention,
        train_data=train_data,
        evals=evals,
        target_eval=path.stem,
        general_tokens=general,
        general_attention_mask=general_mask,
    )


def _is_ctlens_tokenizer(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` has exactly the task language's vocabulary."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    return get_vocab is not None and dict(get_vocab()) == dict(word_to_id())


def _check_unknown_words(path: Path, tokenizer: Any, data: TaskData) -> None:
    """Raise if a line maps any word to the unknown token (a silent ``<unk>`` answer)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    tensors = [data.clean, data.corrupt, data.correct, data.wrong]
    bad_rows = torch.zeros(len(data), dtype=torch.bool)
    for t in tensors:
        if t is not None:
            bad_rows |= (t == unk).reshape(len(data), -1).any(1)
    if not bad_rows.any():
        return
    row = int(bad_rows.nonzero()[0])
    lineno = _nonblank_line_numbers(path)[row]
    raise ValueError(
        f"{path}, line {lineno}: a word is not in the tokenizer's vocabulary (it maps to "
        f"{tokenizer.unk_token!r}); use only known words (ctlens.tasks.language.vocabulary())"
    )


def _nonblank_line_numbers(path: Path) -> list[int]:
    with path.open(encoding="utf-8") as handle:
        return [i for i, line in enumerate(handle, start=1) if line.strip()]

