"""Task accuracies of a plain HF causal LM on fresh seeded samples of every task.

Used by training (progress and ``training.json``), the model cards and the tests, so all
three report the same numbers. Works on the plain HF module (logits are identical to the
TransformerBridge's, and it is faster).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float, Int
from transformers import PreTrainedModel

from ctlens.tasks import generators
from ctlens.tasks.corpus import general_rows
from ctlens.tasks.language import CONTENT_WORDS, FEMALE_OCCUPATIONS, MALE_OCCUPATIONS, stereotype
from ctlens.tasks.tokenizer import PAD, word_to_id

THRESHOLDS: dict[str, float] = {
    "agreement_acc": 0.95,
    "ioi_acc": 0.90,
    "pronoun_stereotype_acc": 0.90,
    "induction_logprob": -1.0,
}
"""What every shipped model must reach (issue 3): accuracies and mean log-probability."""


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: Int[torch.Tensor, "b s"]) -> Float[torch.Tensor, "b s v"]:
    mask = (ids != word_to_id()[PAD]).long()
    mask[:, 0] = 1
    return model(input_ids=ids, attention_mask=mask).logits.float()


def answer_logit_diff(
    model: torch.nn.Module, batch: generators.PromptBatch
) -> Float[torch.Tensor, " b"]:
    """Per-example logit(correct) - logit(wrong) at the answer position."""
    if batch.wrong is None:
        raise ValueError("answer_logit_diff needs a batch with wrong answers")
    logits = _logits(model, batch.clean)
    at = logits[torch.arange(len(batch)), batch.positions]
    return at.gather(1, batch.correct[:, None])[:, 0] - at.gather(1, batch.wrong[:, None])[:, 0]


def answer_logprob(
    model: torch.nn.Module, batch: generators.PromptBatch
) -> Float[torch.Tensor, "b p"]:
    """Log-probability of ``correct`` at every scored position (``[b, P]`` batches)."""
    logp = _logits(model, batch.clean).log_softmax(-1)
    rows = torch.arange(len(batch))[:, None]
    return logp[rows, batch.positions].gather(2, batch.correct[..., None])[..., 0]


@torch.no_grad()
def general_loss(model: torch.nn.Module, n: int = 64, seed: int = 0, context: int = 64) -> float:
    """Mean next-token cross-entropy on held-out general corpus rows."""
    ids = general_rows(n, context, seed)
    logits = _logits(model, ids)
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            ids[:, 1:].reshape(-1),
            ignore_index=word_to_id()[PAD],
        )
    )


def evaluate(model: torch.nn.Module, n: int = 256, seed: int = 12345) -> dict[str, float]:
    """All task metrics on fresh samples (``n`` per task, seeded).

    Returns ``agreement_acc``, ``ioi_acc`` (fraction with logit diff > 0),
    ``pronoun_acc`` (examples preferring the stereotyped pronoun),
    ``pronoun_stereotype_acc`` (fraction of stereotyped occupations whose mean she - he
    logit difference has the stereotype's sign), ``pronoun_mean_abs_diff``,
    ``induction_logprob`` (mean log-prob of the repeated tokens), ``induction_chance``
    and ``general_loss``.
    """
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float] = {}
        for name in ("agreement", "ioi"):
            diff = answer_logit_diff(model, generators.GENERATORS[name](n, seed))
            out[f"{name}_acc"] = float((diff > 0).float().mean())
        occupations = [*FEMALE_OCCUPATIONS, *MALE_OCCUPATIONS]
        batch = generators.pronoun(max(n, 4 * len(occupations)), seed)
        diff = answer_logit_diff(model, batch)
        sign = torch.tensor([1.0 if stereotype(g) == "she" else -1.0 for g in batch.groups])
        out["pronoun_acc"] = float((diff * sign > 0).float().mean())
        per_occ = [
            float(diff[[i for i, g in enumerate(batch.groups) if g == occ]].mean())
            * (1.0 if stereotype(occ) == "she" else -1.0)
            for occ in occupations
        ]
        out["pronoun_stereotype_acc"] = sum(d > 0 for d in per_occ) / len(per_occ)
        out["pronoun_mean_abs_diff"] = float(diff.abs().mean())
        out["induction_logprob"] = float(
            answer_logprob(model, generators.induction(n, seed)).mean()
        )
        out["induction_chance"] = -math.log(len(CONTENT_WORDS))
        out["general_loss"] = general_loss(model, min(n, 128), seed)
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def attention_patterns(
    model: PreTrainedModel, ids: Int[torch.Tensor, "b s"]
) -> Float[torch.Tensor, "layers heads b q k"]:
    """Attention patterns of every head (runs eager attention, then restores the setting)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return torch.stack(out.attentions).transpose(1, 2).float()


PREVIOUS_TOKEN_THRESHOLD = 0.3
"""A head counts as a previous-token head when at least this share of its attention (about
5x the uniform share on these ~18-token prompts) lands on the previous token."""

Head = tuple[int, int, float]


def induction_heads(
    model: PreTrainedModel, n: int = 32, seed: int = 2024, length: int = 12
) -> dict[str, Any]:
    """Locate the induction head and the previous-token heads from attention patterns alone.

    On repeated random sequences, the induction score of a head is its attention from the
    second copy's token ``x_i`` to the token after ``x_i``'s first occurrence; the
    previous-token score is its attention from a token to the one just before it. The
    induction head is the best-scoring head above layer 0. Previous-token heads are the
    heads below its layer whose score reaches :data:`PREVIOUS_TOKEN_THRESHOLD` (a model may
    have several, e.g. diffuse ones in layer 0 and a sharp one later). Returns
    ``{"induction": (layer, head, score), "previous": best (layer, head, score),
    "previous_heads": [(layer, head, score), ...] best first}``.
    """
    batch = generators.induction(n, seed, length=length)
    att = attention_patterns(model, batch.clean)
    q = torch.arange(length + 1, 2 * length)
    induction = att[:, :, :, q, q - length + 1].mean((-1, -2))
    prev = att[:, :, :, q, q - 1].mean((-1, -2))
    if induction.shape[0] < 2:
        raise ValueError("an induction circuit needs at least two layers")
    induction[0] = -1.0
    layer, head = divmod(int(induction.argmax()), induction.shape[1])
    prev[layer:] = -1.0
    n_heads = prev.shape[1]
    order = prev.flatten().argsort(descending=True).tolist()
    ranked: list[Head] = [(i // n_heads, i % n_heads, float(prev.flatten()[i])) for i in order]
    return {
        "induction": (layer, head, float(induction[layer, head])),
        "previous": ranked[0],
        "previous_heads": [h for h in ranked if h[2] >= PREVIOUS_TOKEN_THRESHOLD],
    }


def passes(metrics: dict[str, float]) -> dict[str, bool]:
    """Which of :data:`THRESHOLDS` the metrics meet."""
    return {key: metrics[key] >= bound for key, bound in THRESHOLDS.items()}
