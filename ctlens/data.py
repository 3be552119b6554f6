"""Task data: clean / corrupt token batches, where the metric is read, and the metrics.

A `TaskData` is the input of attribution and faithfulness. It holds right-padded token ids
(``clean`` and, optionally, ``corrupt`` of the same shape), a padding mask, the position(s)
where the metric is read and the answer ids there. Build it from tensors, from prompt
strings (`TaskData.from_prompts`) or from a JSONL file (`TaskData.from_jsonl`).

Tokenization rules: prompts get the tokenizer's usual BOS handling; an answer is
tokenized as the continuation of its prompt (a leading space is added when the answer has
none, which is what BPE vocabularies such as GPT-2's expect) and must be one token; a
clean/corrupt pair must tokenize to the same length; a word the tokenizer does not know
(one it would turn into its unknown token) is refused. Each violation names the offending
example or line.

Metrics map logits to one value per example (averaged over the metric positions):

- ``logit_diff``: logit(correct) - logit(wrong)
- ``prob_diff``: p(correct) - p(wrong)
- ``logprob``: log p(correct)
- ``kl``: KL(clean distribution || current distribution) at the metric positions

A custom metric is a callable ``fn(logits, batch) -> Tensor`` returning one value per
example (``[batch]``) or the batch mean (a scalar).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from ctlens.spans import CharRanges, check_span_labels, prompt_span_labels
from ctlens.tokens import (
    UnitError,
    answer_id,
    encode_known,
    unknown_token_id,
)

MetricFn = Callable[..., torch.Tensor]
BUILTIN_METRICS = ("logit_diff", "prob_diff", "logprob", "kl")
JSONL_FIELDS = ("prompt", "corrupt_prompt", "answer", "wrong_answer")


@dataclass(frozen=True)
class TaskData:
    """A batch (or dataset) of task examples. See the module docstring.

    Args:
        clean: ``[batch, seq]`` token ids, right-padded.
        corrupt: ``[batch, seq]`` token ids of the paired corrupted prompts, or ``None``
            (then only ``mean`` / ``zero`` ablation is possible).
        correct: answer ids, ``[batch]`` or ``[batch, P]`` (one per metric position).
        wrong: wrong-answer ids of the same shape, or ``None`` for metrics that need none.
        positions: where the metric is read, ``[batch]`` or ``[batch, P]``; default: the
            last non-padding token of each example.
        attention_mask: bool ``[batch, seq]``, True on real tokens; default: all True.
        metric: a built-in metric name or a callable (see the module docstring).
        spans: optional ``[batch, seq]`` span label per token, an index into
            ``span_names`` (`ctlens.spans`): every real token needs one; padding is stored
            as -1 (no span). Positional attribution and circuits score edges per span.
        span_names: the names of the span labels 0, 1, ... (given with ``spans``).
    """

    clean: Int[torch.Tensor, "batch seq"]
    corrupt: Int[torch.Tensor, "batch seq"] | None = None
    correct: Int[torch.Tensor, " batch *P"] | None = None
    wrong: Int[torch.Tensor, " batch *P"] | None = None
    positions: Int[torch.Tensor, " batch *P"] | None = None
    attention_mask: Bool[torch.Tensor, "batch seq"] | None = None
    metric: str | MetricFn = "logit_diff"
    spans: Int[torch.Tensor, "batch seq"] | None = None
    span_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        clean = _as_long(self.clean, "clean")
        if clean.ndim != 2:
            raise ValueError(
                f"clean must be [batch, seq] token ids, got shape {tuple(clean.shape)}"
            )
        if clean.shape[0] == 0 or clean.shape[1] == 0:
            raise ValueError(
                f"TaskData is empty (clean has shape {tuple(clean.shape)}); "
                "pass at least one example with at least one token"
            )
        object.__setattr__(self, "clean", clean)
        batch, seq = clean.shape
        if self.corrupt is not None:
            corrupt = _as_long(self.corrupt, "corrupt")
            if corrupt.shape != clean.shape:
                raise ValueError(
                    f"clean and corrupt must have the same shape, got {tuple(clean.shape)} and "
                    f"{tuple(corrupt.shape)}; pair each clean prompt with a corrupted prompt "
                    "of the same token length"
                )
            object.__setattr__(self, "corrupt", corrupt)

        mask = self.attention_mask
        mask = (
            torch.ones_like(clean, dtype=torch.bool)
            if mask is None
            else torch.as_tensor(mask, device=clean.device).bool()
        )
        if mask.shape != clean.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, expected {tuple(clean.shape)}"
            )
        lengths = mask.sum(1)
        if (lengths == 0).any():
            bad = int((lengths == 0).nonzero()[0])
            raise ValueError(f"example {bad} has no real tokens (its attention_mask is all False)")
        if (mask.long().diff(dim=1) > 0).any():
            raise ValueError("attention_mask must be right-padded: True tokens first, then False")
        object.__setattr__(self, "attention_mask", mask)
        if self.spans is not None:
            labels, names = check_span_labels(self.spans, self.span_names, mask)
            object.__setattr__(self, "spans", labels)
            object.__setattr__(self, "span_names", names)
        elif self.span_names is not None:
            raise ValueError(
                "span_names were given without spans: pass spans=[batch, seq] labels too"
            )

        positions = self.positions
        positions = (lengths - 1) if positions is None else _as_long(positions, "positions")
        if positions.shape[0] != batch or positions.ndim not in (1, 2):
            raise ValueError(
                f"positions must be [batch] or [batch, P] with batch={batch}, "
                f"got shape {tuple(positions.shape)}"
            )
        pos2d = positions if positions.ndim == 2 else positions[:, None]
        if (pos2d < 0).any() or (pos2d >= lengths[:, None]).any():
            row = int(((pos2d < 0) | (pos2d >= lengths[:, None])).any(1).nonzero()[0])
            raise ValueError(
                f"example {row}: metric position(s) {pos2d[row].tolist()} fall outside its "
                f"{int(lengths[row])} real tokens"
            )
        object.__setattr__(self, "positions", positions)

        if isinstance(self.metric, str) and self.metric not in BUILTIN_METRICS:
            raise ValueError(
                f"unknown metric {self.metric!r}; choose one of {BUILTIN_METRICS} "
                "or pass a callable"
            )
        if not isinstance(self.metric, str) and not callable(self.metric):
            raise TypeError(
                f"metric must be a name or a callable, got {type(self.metric).__name__}"
            )
        needs_correct = self.metric in ("logit_diff", "prob_diff", "logprob")
        needs_wrong = self.metric in ("logit_diff", "prob_diff")
        for name, needed in (("correct", needs_correct), ("wrong", needs_wrong)):
            ids = getattr(self, name)
            if ids is None:
                if needed:
                    raise ValueError(f"metric {self.metric!r} needs {name!r} answer ids")
                continue
            ids = _as_long(ids, name)
            if ids.shape != positions.shape:
                raise ValueError(
                    f"{name} has shape {tuple(ids.shape)} but positions has shape "
                    f"{tuple(positions.shape)}: give one answer per metric position"
                )
            object.__setattr__(self, name, ids)

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def positions_2d(self) -> Int[torch.Tensor, "batch P"]:
        """Metric positions as ``[batch, P]``."""
        assert self.positions is not None
        return self.positions if self.positions.ndim == 2 else self.positions[:, None]

    @property
    def device(self) -> torch.device:
        """The device of the token tensors."""
        return self.clean.device

    def to(self, device: torch.device | str) -> TaskData:
        """A copy with every tensor on ``device``."""
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in self._fields().items()
        }
        return replace(self, **moved)

    def __getitem__(self, index: slice | torch.Tensor) -> TaskData:
        """Select examples (a slice or an index tensor)."""
        return replace(
            self,
            **{
                name: (value[index] if isinstance(value, torch.Tensor) else value)
                for name, value in self._fields().items()
            },
        )

    def batches(self, batch_size: int | None) -> Iterator[TaskData]:
        """Consecutive batches of at most ``batch_size`` examples (all at once if ``None``)."""
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        size = batch_size or len(self)
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def trimmed(self) -> TaskData:
        """Drop trailing all-padding columns (saves work after slicing a batch)."""
        assert self.attention_mask is not None
        keep = int(self.attention_mask.sum(1).max())
        if keep == self.clean.shape[1]:
            return self
        fields = self._fields()
        for name in ("clean", "corrupt", "attention_mask", "spans"):
            if fields[name] is not None:
                fields[name] = fields[name][:, :keep]
        return replace(self, **fields)

    def _fields(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "corrupt": self.corrupt,
            "correct": self.correct,
            "wrong": self.wrong,
            "positions": self.positions,
            "attention_mask": self.attention_mask,
            "spans": self.spans,
        }

    @property
    def n_spans(self) -> int:
        """Number of spans (0 without spans)."""
        return 0 if self.span_names is None else len(self.span_names)

    def with_position_spans(self) -> TaskData:
        """A copy whose spans are the token positions: span ``p{t}`` is position ``t``.

        With prompts of one length this is PEAP's per-position schema; with padded prompts
        of different lengths a position has no shared role, so named spans align better.
        """
        assert self.attention_mask is not None
        seq = self.clean.shape[1]
        labels = torch.arange(seq, device=self.device).expand_as(self.clean)
        return replace(self, spans=labels, span_names=tuple(f"p{t}" for t in range(seq)))

    def check_vocab(self, d_vocab: int) -> None:
        """Raise if a token id is outside ``[0, d_vocab)``."""
        for name in ("clean", "corrupt", "correct", "wrong"):
            ids = getattr(self, name)
            if ids is None:
                continue
            ids = ids if name not in ("clean", "corrupt") else ids[self.attention_mask]
            bad = (ids < 0) | (ids >= d_vocab)
            if bad.any():
                value = int(ids[bad][0])
                raise ValueError(
                    f"{name} holds token id {value}, outside the model's vocabulary of "
                    f"{d_vocab}; tokenize with the model's own tokenizer"
                )

    def check_context(self, n_ctx: int | None) -> None:
        """Raise if an example is longer than the model's context of ``n_ctx`` positions.

        Without this, a model with learned position embeddings fails deep inside its
        embedding with an ``IndexError``. ``None`` (context unknown) checks nothing.
        """
        if n_ctx is None:
            return
        assert self.attention_mask is not None
        lengths = self.attention_mask.sum(1)
        over = (lengths > n_ctx).nonzero()
        row = int(over[0]) if len(over) else 0
        check_length(int(lengths[row]), n_ctx, f"example {row}",
                     f"shorten the prompt(s) to at most {n_ctx} tokens or use a model with a "
                     "longer context")

    # ------------------------------------------------------------------ metrics

    def metric_values(
        self,
        logits: Float[torch.Tensor, "batch seq vocab"],
        clean_logits: Float[torch.Tensor, "batch seq vocab"] | None = None,
    ) -> Float[torch.Tensor, " batch"]:
        """The metric for each example (averaged over its metric positions), in fp32.

        ``clean_logits`` is needed by ``kl`` only: the reference distribution. Raises
        `MetricError` for a non-finite value (naming the example) and, when ``logits``
        require grad, for a metric that is not differentiable in them.
        """
        values = self._raw_metric_values(logits, clean_logits)
        _check_metric_values(values, logits)
        return values

    def _raw_metric_values(
        self,
        logits: Float[torch.Tensor, "batch seq vocab"],
        clean_logits: Float[torch.Tensor, "batch seq vocab"] | None,
    ) -> Float[torch.Tensor, " batch"]:
        if callable(self.metric):
            return _call_user_metric(self.metric, logits, self)
        rows = torch.arange(len(self), device=logits.device)[:, None]
        at = logits[rows, self.positions_2d.to(logits.device)].float()  # [batch, P, vocab]
        if self.metric == "kl":
            if clean_logits is None:
                raise ValueError("the 'kl' metric needs the clean run's logits")
            ref = clean_logits[rows, self.positions_2d.to(logits.device)].float()
            kl = F.kl_div(
                at.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none"
            ).sum(-1)
            return kl.mean(-1)
        correct = _ids_2d(self.correct).to(logits.device)
        if self.metric == "logprob":
            return at.log_softmax(-1).gather(-1, correct[..., None])[..., 0].mean(-1)
        wrong = _ids_2d(self.wrong).to(logits.device)
        values = at.softmax(-1) if self.metric == "prob_diff" else at
        diff = values.gather(-1, correct[..., None]) - values.gather(-1, wrong[..., None])
        return diff[..., 0].mean(-1)

    # ------------------------------------------------------------------ from text

    @classmethod
    def from_prompts(
        cls,
        tokenizer: Any,
        prompts: Sequence[str],
        corrupt_prompts: Sequence[str] | None = None,
        answers: Sequence[str] | None = None,
        wrong_answers: Sequence[str] | None = None,
        metric: str | MetricFn = "logit_diff",
        spans: Sequence[CharRanges] | None = None,
        template: str | None = None,
    ) -> TaskData:
        """Tokenize prompts and one-token answers following the rules above: BOS as the
        tokenizer adds it, one-token answers, equal clean/corrupt lengths, no unknown words.

        ``spans`` (per prompt, ``{name: (start, end)}`` character ranges) or ``template`` (a
        string with named slots, ``"when {io} and {s} went to the store"``, that every
        prompt must match) label each token with a span (`ctlens.spans`); tokens outside
        the named spans go to ``"other"``, the last span. The corrupt prompts share the
        clean prompts' token positions, hence their spans.
        """
        if tokenizer is None:
            raise ValueError(
                "no tokenizer: load the model with ctlens.load_model (which attaches one) "
                "or pass a tokenizer explicitly"
            )
        if len(prompts) == 0:
            raise ValueError("no prompts given: pass at least one example")
        for name, seq in (
            ("corrupt_prompts", corrupt_prompts),
            ("answers", answers),
            ("wrong_answers", wrong_answers),
        ):
            if seq is not None and len(seq) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(seq)} {name}")

        unk = unknown_token_id(tokenizer)
        clean_ids = [encode_known(tokenizer, p, unk, i, "prompt") for i, p in enumerate(prompts)]
        corrupt_ids = None
        if corrupt_prompts is not None:
            corrupt_ids = [
                encode_known(tokenizer, p, unk, i, "corrupt prompt")
                for i, p in enumerate(corrupt_prompts)
            ]
            for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids, strict=True)):
                if len(a) != len(b):
                    raise UnitError(
                        i,
                        f"the clean prompt has {len(a)} tokens but the corrupt prompt has "
                        f"{len(b)}; corrupted prompts must have the same token length as their "
                        "clean prompt",
                    )
        correct = wrong = None
        if answers is not None:
            correct = [
                answer_id(tokenizer, p, a, i, unk)
                for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
            ]
        if wrong_answers is not None:
            wrong = [
                answer_id(tokenizer, p, a, i, unk)
                for i, (p, a) in enumerate(zip(prompts, wrong_answers, strict=True))
            ]

        labels: list[list[int]] | None = None
        names: tuple[str, ...] | None = None
        if spans is not None or template is not None:
            labels, names = prompt_span_labels(tokenizer, prompts, clean_ids, spans, template)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else pad
        width = max(len(ids) for ids in clean_ids)
        span_tensor = None if labels is None else torch.full((len(prompts), width), -1)
        clean = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        corrupt = None if corrupt_ids is None else clean.clone()
        for i, ids in enumerate(clean_ids):
            clean[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = True
            if corrupt is not None and corrupt_ids is not None:
                corrupt[i, : len(ids)] = torch.tensor(corrupt_ids[i])
            if span_tensor is not None and labels is not None:
                span_tensor[i, : len(ids)] = torch.tensor(labels[i])
        return cls(
            clean=clean,
            corrupt=corrupt,
            correct=None if correct is None else torch.tensor(correct),
            wrong=None if wrong is None else torch.tensor(wrong),
            attention_mask=mask,
            metric=metric,
            spans=span_tensor,
            span_names=names,
        )

    @classmethod
    def from_jsonl(
        cls,
        path: str | Path,
        tokenizer: Any,
        metric: str | MetricFn = "logit_diff",
        template: str | None = None,
    ) -> TaskData:
        """Load ``prompt``, ``corrupt_prompt``, ``answer``, ``wrong_answer`` records.

        Spans (`from_prompts`): a ``template`` every prompt matches, or a ``spans`` field
        on every line (``{"subject": [0, 8], ...}``, character ranges of the prompt).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} does not exist")
        records: list[dict[str, str]] = []
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}, line {lineno}: expected a JSON object")
                missing = [f for f in JSONL_FIELDS if f not in record]
                if missing:
                    raise ValueError(
                        f"{path}, line {lineno}: missing field(s) {missing}; every line needs "
                        f"{list(JSONL_FIELDS)}"
                    )
                record["_line"] = lineno
                records.append(record)
        if not records:
            raise ValueError(f"task file {path} holds no examples")
        lines = [r["_line"] for r in records]
        with_spans = [r["_line"] for r in records if "spans" in r]
        if with_spans and len(with_spans) != len(records):
            missing = next(r["_line"] for r in records if "spans" not in r)
            raise ValueError(
                f"{path}, line {missing}: no 'spans' field, but line {with_spans[0]} has one; "
                "give spans on every line or on none"
            )
        try:
            return cls.from_prompts(
                tokenizer,
                [r["prompt"] for r in records],
                [r["corrupt_prompt"] for r in records],
                [r["answer"] for r in records],
                [r["wrong_answer"] for r in records],
                metric=metric,
                spans=[r["spans"] for r in records] if with_spans else None,
                template=template,
            )
        except UnitError as err:
            raise ValueError(f"{path}, line {lines[err.index]}: {err.message}") from None


# ---------------------------------------------------------------------- helpers


def _as_long(value: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids or positions, got {tensor.dtype}")
    return tensor.long()


def _ids_2d(ids: torch.Tensor | None) -> torch.Tensor:
    assert ids is not None
    return ids if ids.ndim == 2 else ids[:, None]


def _call_user_metric(fn: MetricFn, logits: torch.Tensor, batch: TaskData) -> torch.Tensor:
    values = fn(logits, batch)
    if not isinstance(values, torch.Tensor):
        raise TypeError(
            f"the metric returned {type(values).__name__}; it must return a tensor: one value "
            "per example ([batch]) or the batch mean (a scalar)"
        )
    if values.ndim == 0:
        values = values.expand(len(batch))
    elif values.shape != (len(batch),):
        raise ValueError(
            f"the metric returned shape {tuple(values.shape)}; it must return a scalar (the "
            f"batch mean) or one value per example, shape ({len(batch)},)"
        )
    if logits.requires_grad and torch.is_grad_enabled() and not values.requires_grad:
        raise MetricError(
            None,
            "the metric must be differentiable in the logits: it returned a tensor with no "
            f"gradient (dtype {values.dtype}), e.g. computed on logits.detach(), through "
            "argmax or a comparison, or as integers; EAP, EAP-IG and circuit-tuning "
            "differentiate the metric, so use a smooth one (a logit difference, a "
            "log-probability) or method='exact'",
        )
    return values.float()


class MetricError(ValueError):
    """A metric value that attribution cannot use.

    ``index`` is the example's row in the batch the metric saw (``None`` when the problem
    is the metric itself); `shifted` renames it to the row of the whole dataset.
    """

    def __init__(self, index: int | None, detail: str) -> None:
        where = "" if index is None else f"example {index}: "
        super().__init__(f"{where}{detail}")
        self.index = index
        self.detail = detail

    def shifted(self, offset: int) -> MetricError:
        """The same error with ``index`` counted from ``offset`` (the batch's first row)."""
        return MetricError(None if self.index is None else self.index + offset, self.detail)


def _check_metric_values(values: torch.Tensor, logits: torch.Tensor) -> None:
    """Refuse non-finite metric values, naming the first bad example and the likely cause."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    row = int((~finite).nonzero()[0])
    value = float(values[row])
    shown = "NaN" if math.isnan(value) else str(value)
    if logits.dtype == torch.float16 and not bool(torch.isfinite(logits[row]).all()):
        cause = (
            "the model runs in float16, whose range (about +-65,504) overflowed; load it "
            "with dtype='bfloat16' or 'float32'"
        )
    else:
        cause = (
            "a metric must be finite on every example; check it on the clean logits (a "
            "log-probability of a token with probability 0 is -inf, a ratio can divide by "
            "zero) and fix or drop that example"
        )
    raise MetricError(row, f"the metric returned {shown} (not finite); {cause}")


def check_length(tokens: int, n_ctx: int | None, what: str, fix: str) -> None:
    """Refuse ``what`` (``tokens`` long) beyond the model's context of ``n_ctx`` positions
    (None: unknown, nothing checked); attribution, faithfulness and `ctlens.plan` check so."""
    if n_ctx is not None and tokens > n_ctx:
        raise ValueError(f"{what} has {tokens} tokens but the model's context is {n_ctx} "
                         f"positions (model.cfg.n_ctx); {fix}")
