"""Tests of ctlens.data: TaskData validation, metrics, batching and tokenization from text."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import ctlens
from ctlens.data import TaskData
from ctlens.spans import OTHER, PADDING

WORDS = [
    "<pad>",
    "<bos>",
    "<unk>",
    "the",
    "capital",
    "of",
    "france",
    "italy",
    "is",
    "paris",
    "rome",
    "big",
    "city",
]


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a BOS post-processor (like the zoo's), built offline."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-like byte-level BPE (leading-space tokens, no BOS), trained offline on a toy text."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(
        ["The capital of France is Paris. The capital of Italy is Rome."] * 50, trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def simple(n: int = 3, seq: int = 4, **kw) -> TaskData:
    clean = torch.arange(n * seq).view(n, seq) % 7 + 1
    return TaskData(
        clean=clean, correct=torch.ones(n, dtype=torch.long), wrong=torch.full((n,), 2), **kw
    )


# ---------------------------------------------------------------- construction and validation


def test_defaults_positions_and_mask():
    clean = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    data = TaskData(
        clean=clean,
        correct=torch.tensor([1, 2]),
        wrong=torch.tensor([3, 4]),
        attention_mask=clean != 0,
    )
    assert data.positions.tolist() == [3, 1]  # last real token of each example
    assert simple().attention_mask.all()
    assert data.positions_2d.shape == (2, 1)


def test_shape_mismatch_says_how_to_fix():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 4\) and \(2, 5\).*same token length"):
        TaskData(
            clean=torch.ones(2, 4, dtype=torch.long),
            corrupt=torch.ones(2, 5, dtype=torch.long),
            correct=torch.ones(2, dtype=torch.long),
            wrong=torch.ones(2, dtype=torch.long),
        )


def test_empty_data_is_refused():
    with pytest.raises(ValueError, match="empty.*at least one example"):
        TaskData(
            clean=torch.zeros(0, 4, dtype=torch.long),
            correct=torch.zeros(0, dtype=torch.long),
            wrong=torch.zeros(0, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="no prompts given"):
        TaskData.from_prompts(object(), [])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clean": torch.ones(4, dtype=torch.long)}, r"\[batch, seq\] token ids"),
        ({"clean": torch.ones(2, 3)}, "integer token ids"),
        ({"attention_mask": torch.tensor([[True, False, True]] * 2)}, "right-padded"),
        (
            {"attention_mask": torch.tensor([[True] * 3, [False] * 3])},
            "example 1 has no real tokens",
        ),
        (
            {"positions": torch.tensor([0, 3])},
            r"example 1: metric position\(s\) \[3\] fall outside",
        ),
        ({"metric": "accuracy"}, "unknown metric 'accuracy'"),
        ({"wrong": None}, "needs 'wrong' answer ids"),
        ({"correct": torch.ones(2, 2, dtype=torch.long)}, "one answer per metric position"),
    ],
)
def test_bad_fields_are_named(kwargs, message):
    fields = {
        "clean": torch.ones(2, 3, dtype=torch.long),
        "correct": torch.ones(2, dtype=torch.long),
        "wrong": torch.ones(2, dtype=torch.long),
        **kwargs,
    }
    with pytest.raises((ValueError, TypeError), match=message):
        TaskData(**fields)


def test_token_outside_vocabulary():
    data = simple()
    data.check_vocab(8)
    with pytest.raises(
        ValueError, match="token id 7, outside the model's vocabulary of 7.*own tokenizer"
    ):
        data.check_vocab(7)
    # padding ids are not checked (they are never read)
    padded = TaskData(
        clean=torch.tensor([[1, 99]]),
        correct=torch.tensor([1]),
        wrong=torch.tensor([2]),
        attention_mask=torch.tensor([[True, False]]),
    )
    padded.check_vocab(3)


def test_batches_and_trimmed():
    clean = torch.tensor([[1, 2, 3], [1, 2, 0], [1, 0, 0]])
    data = TaskData(
        clean=clean,
        corrupt=clean.flip(0).clamp(min=1) * (clean > 0),
        correct=torch.tensor([1, 2, 3]),
        wrong=torch.tensor([4, 5, 6]),
        attention_mask=clean > 0,
    )
    batches = list(data.batches(2))
    assert [len(b) for b in batches] == [2, 1]
    last = batches[1].trimmed()
    assert last.clean.shape == (1, 1) and last.corrupt.shape == (1, 1)
    assert last.correct.tolist() == [3] and last.positions.tolist() == [0]
    assert len(list(data.batches(None))) == 1
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(data.batches(0))
    assert data[torch.tensor([2, 0])].positions.tolist() == [0, 2]


# ---------------------------------------------------------------- metrics


def test_builtin_metrics_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 9, dtype=torch.float64)
    clean_logits = torch.randn(3, 4, 9, dtype=torch.float64)
    data = simple(positions=torch.tensor([3, 1, 2]))
    rows = torch.arange(3)
    at = logits[rows, data.positions]
    ref = clean_logits[rows, data.positions]
    expected = {
        "logit_diff": at[:, 1] - at[:, 2],
        "prob_diff": at.softmax(-1)[:, 1] - at.softmax(-1)[:, 2],
        "logprob": at.log_softmax(-1)[:, 1],
        "kl": (ref.softmax(-1) * (ref.log_softmax(-1) - at.log_softmax(-1))).sum(-1),
    }
    for name, value in expected.items():
        got = TaskData(
            clean=data.clean,
            correct=data.correct,
            wrong=data.wrong,
            positions=data.positions,
            metric=name,
        ).metric_values(logits, clean_logits)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, value.float(), rtol=1e-5, atol=1e-6)
    kl = TaskData(clean=data.clean, metric="kl")
    assert kl.metric_values(logits, logits).abs().max() < 1e-6
    with pytest.raises(ValueError, match="needs the clean run's logits"):
        kl.metric_values(logits)


def test_multi_position_metric_averages_positions():
    logits = torch.randn(2, 5, 7)
    positions = torch.tensor([[1, 3], [0, 4]])
    correct = torch.tensor([[1, 2], [3, 4]])
    wrong = torch.tensor([[5, 6], [0, 1]])
    data = TaskData(
        clean=torch.ones(2, 5, dtype=torch.long), positions=positions, correct=correct, wrong=wrong
    )
    expected = torch.stack(
        [
            (logits[b, positions[b], correct[b]] - logits[b, positions[b], wrong[b]]).mean()
            for b in range(2)
        ]
    )
    torch.testing.assert_close(data.metric_values(logits), expected)


def test_custom_metric_checks():
    logits = torch.randn(3, 4, 9)
    per_example = simple(metric=lambda lg, batch: lg[:, -1, 0])
    assert per_example.metric_values(logits).shape == (3,)
    mean = simple(metric=lambda lg, batch: lg[:, -1, 0].mean())
    torch.testing.assert_close(mean.metric_values(logits), logits[:, -1, 0].mean().expand(3))
    with pytest.raises(ValueError, match=r"returned shape \(3, 9\).*scalar.*one value per example"):
        simple(metric=lambda lg, batch: lg[:, -1]).metric_values(logits)
    with pytest.raises(ValueError, match="returned NaN"):
        simple(metric=lambda lg, batch: lg[:, -1, 0] * float("nan")).metric_values(logits)
    with pytest.raises(TypeError, match="returned float; it must return a tensor"):
        simple(metric=lambda lg, batch: 1.0).metric_values(logits)
    with pytest.raises(TypeError, match="name or a callable"):
        simple(metric=3)


# ---------------------------------------------------------------- from text


def test_from_prompts_word_level(word_tokenizer):
    data = TaskData.from_prompts(
        word_tokenizer,
        ["the capital of france is", "the big city is"],
        ["the capital of italy is", "the big capital is"],
        ["paris", " rome"],
        ["rome", "paris"],
    )
    bos, pad = word_tokenizer.bos_token_id, word_tokenizer.pad_token_id
    ids = {w: i for i, w in enumerate(WORDS)}
    assert data.clean.tolist() == [
        [bos, ids["the"], ids["capital"], ids["of"], ids["france"], ids["is"]],
        [bos, ids["the"], ids["big"], ids["city"], ids["is"], pad],
    ]
    assert data.corrupt[0, 4] == ids["italy"] and data.corrupt[1, 5] == pad
    assert data.attention_mask.sum(1).tolist() == [6, 5]
    assert data.positions.tolist() == [5, 4]
    assert data.correct.tolist() == [ids["paris"], ids["rome"]]
    assert data.wrong.tolist() == [ids["rome"], ids["paris"]]


def test_from_prompts_gpt2_like_bpe(bpe_tokenizer):
    data = TaskData.from_prompts(
        bpe_tokenizer,
        ["The capital of France is"],
        ["The capital of Italy is"],
        ["Paris"],
        ["Rome"],
    )
    assert bpe_tokenizer.decode(data.correct.tolist()) == " Paris"  # the leading space is added
    assert bpe_tokenizer.decode(data.wrong.tolist()) == " Rome"
    assert data.clean.shape == data.corrupt.shape == (1, 5)
    with pytest.raises(
        ValueError, match=r"example 0: answer 'Berlin' is \d+ tokens .*exactly one token"
    ):
        TaskData.from_prompts(
            bpe_tokenizer, ["The capital of France is"], answers=["Berlin"], wrong_answers=["Rome"]
        )


def test_from_prompts_errors(word_tokenizer):
    with pytest.raises(
        ValueError, match="example 1: the clean prompt has 4 tokens but the corrupt prompt has 3"
    ):
        TaskData.from_prompts(
            word_tokenizer,
            ["the city", "the big city"],
            ["the rome", "the city"],
            ["is", "is"],
            ["of", "of"],
        )
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        TaskData.from_prompts(word_tokenizer, ["the", "the"], answers=["is"])
    with pytest.raises(ValueError, match="no tokenizer"):
        TaskData.from_prompts(None, ["the"])
    with pytest.raises(ValueError, match="answer 'big city' is 2 tokens"):
        TaskData.from_prompts(word_tokenizer, ["the"], answers=["big city"], metric="logprob")


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("prompt", "example 1: a word is not in the tokenizer's vocabulary: 'berlin' in the prom"),
        ("corrupt", "example 1: .*vocabulary: 'madrid' in the corrupt prompt 'the capital of"),
        ("answer", "example 1: .*vocabulary: 'berlin' in the answer"),
        ("wrong", "example 1: .*vocabulary: 'lisbon' in the answer"),
    ],
)
def test_from_prompts_refuses_unknown_words(word_tokenizer, where, message):
    """An unknown word maps to <unk>: clean would equal corrupt and every score would be 0."""
    prompts = ["the capital of france is", "the capital of italy is"]
    corrupt = ["the capital of italy is", "the capital of france is"]
    answers, wrong = ["paris", "rome"], ["rome", "paris"]
    if where == "prompt":
        prompts[1] = "the capital of berlin is"
    elif where == "corrupt":
        corrupt[1] = "the capital of madrid is"
    elif where == "answer":
        answers[1] = "berlin"
    else:
        wrong[1] = "lisbon"
    with pytest.raises(ValueError, match=message):
        TaskData.from_prompts(word_tokenizer, prompts, corrupt, answers, wrong)


def test_from_prompts_byte_level_bpe_has_no_unknown_words(bpe_tokenizer):
    """GPT-2-style tokenizers name <|endoftext|> as unk (it is also EOS): never refused."""
    data = TaskData.from_prompts(
        bpe_tokenizer, ["Zebras of Oslo"], answers=["Paris"], metric="logprob"
    )
    assert len(data) == 1
    # as GPT-2's own tokenizer: <|endoftext|> is its unk, BOS and EOS at once
    gpt2_like = PreTrainedTokenizerFast(
        tokenizer_object=bpe_tokenizer.backend_tokenizer, unk_token="<|endoftext|>",
        bos_token="<|endoftext|>", eos_token="<|endoftext|>",
    )
    data = TaskData.from_prompts(
        gpt2_like, ["The capital of France is ☃"], ["The capital of Italy is ☃"], ["Paris"],
        ["Rome"],
    )
    assert not torch.equal(data.clean, data.corrupt)


ZEBRA = ("the zebra near the lamps", "the zebras near the lamps")  # the silent case


def _zoo_tokenizers() -> list[tuple[str, str]]:
    return [(name, how) for name in ctlens.zoo.names() for how in ("shipped", "bridge")]


@pytest.mark.parametrize(("name", "how"), _zoo_tokenizers())
def test_zoo_tokenizers_refuse_unknown_words(name: str, how: str) -> None:
    """Unknown words became <unk> on the shipped models, so clean equalled corrupt and every
    score was 0: the bridge makes <unk> the zoo tokenizer's EOS too, which switched the check
    off. Refused now, naming the word, with the tokenizer as shipped and as the bridge holds
    it; a prompt of known words still passes on the same tokenizer."""
    tok = ctlens.zoo.tokenizer(name) if how == "shipped" else \
        ctlens.load_model(f"zoo:{name}").tokenizer
    if how == "bridge":
        assert tok.eos_token_id == tok.unk_token_id  # the case that hid the problem
    with pytest.raises(ValueError, match="example 0: .*vocabulary: 'zebra' in the prompt"):
        TaskData.from_prompts(tok, [ZEBRA[0]], [ZEBRA[1]], ["is"], ["are"])
    with pytest.raises(ValueError, match="'zebras' in the corrupt prompt"):
        TaskData.from_prompts(tok, ["the dog near the lamps"], [ZEBRA[1]], ["is"], ["are"])
    with pytest.raises(ValueError, match="'zebra' in the answer"):
        TaskData.from_prompts(tok, ["the dog near the"], ["the dogs near the"], ["zebra"],
                              ["is"])
    data = TaskData.from_prompts(tok, ["the dog near the lamps"], ["the dogs near the lamps"],
                                 ["is"], ["are"])
    assert not torch.equal(data.clean, data.corrupt)


def test_bpe_with_unknown_characters_refuses_them() -> None:
    """A (non-byte-level) BPE maps characters it never saw to its unk token; with that id
    shared with EOS, as on the bridge's zoo tokenizer, the check still holds."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>"])
    bpe.train_from_iterator(["the dogs near the lamps run", "the dog near the lamp runs"] * 20,
                            trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<unk>",
                                  bos_token="<s>")
    with pytest.raises(ValueError, match="'zébra' in the prompt 'the zébra near the lamps'"):
        TaskData.from_prompts(tok, ["the zébra near the lamps"], ["the zébras near the lamps"],
                              ["run"], ["near"])
    data = TaskData.from_prompts(tok, ["the dog near the lamps"], ["the dogs near the lamp"],
                                 ["run"], ["near"])
    assert not torch.equal(data.clean, data.corrupt)


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_from_jsonl(word_tokenizer, tmp_path):
    rec = {
        "prompt": "the capital of france is",
        "corrupt_prompt": "the capital of italy is",
        "answer": "paris",
        "wrong_answer": "rome",
    }
    path = write_jsonl(
        tmp_path / "task.jsonl", [rec, "", {**rec, "answer": "rome", "wrong_answer": "paris"}]
    )
    data = TaskData.from_jsonl(path, word_tokenizer, metric="prob_diff")
    assert len(data) == 2 and data.metric == "prob_diff"
    assert data.correct.tolist() == [WORDS.index("paris"), WORDS.index("rome")]


def test_from_jsonl_errors_name_the_line(word_tokenizer, tmp_path):
    rec = {
        "prompt": "the city is",
        "corrupt_prompt": "the rome is",
        "answer": "big",
        "wrong_answer": "of",
    }
    missing = {k: v for k, v in rec.items() if k != "wrong_answer"}
    path = write_jsonl(tmp_path / "a.jsonl", [rec, missing])
    with pytest.raises(
        ValueError,
        match=r"a.jsonl, line 2: missing field\(s\) \['wrong_answer'\]; every line needs",
    ):
        TaskData.from_jsonl(path, word_tokenizer)
    path = write_jsonl(tmp_path / "b.jsonl", [rec, "{not json"])
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        TaskData.from_jsonl(path, word_tokenizer)
    path = write_jsonl(tmp_path / "c.jsonl", [rec, rec, {**rec, "corrupt_prompt": "the is"}])
    with pytest.raises(
        ValueError, match="line 3: the clean prompt has 4 tokens but the corrupt prompt has 3"
    ):
        TaskData.from_jsonl(path, word_tokenizer)
    path = write_jsonl(tmp_path / "d.jsonl", [{**rec, "answer": "big city"}])
    with pytest.raises(ValueError, match="line 1: answer 'big city' is 2 tokens"):
        TaskData.from_jsonl(path, word_tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TaskData.from_jsonl(tmp_path / "none.jsonl", word_tokenizer)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no examples"):
        TaskData.from_jsonl(tmp_path / "e.jsonl", word_tokenizer)


def test_public_names():
    assert ctlens.TaskData is TaskData


def labelled(data: TaskData, tokenizer, row: int = 0) -> list[tuple[str, str]]:
    """(token, span name) of one example's real tokens."""
    n = int(data.attention_mask[row].sum())
    tokens = tokenizer.convert_ids_to_tokens(data.clean[row, :n].tolist())
    return [(t, data.span_names[k]) for t, k in zip(tokens, data.spans[row, :n].tolist(),
                                                    strict=True)]


# ---------------------------------------------------------------- TaskData spans


def test_template_labels_tokens_and_aligns_prompts_of_different_lengths(word_tokenizer):
    data = TaskData.from_prompts(
        word_tokenizer,
        ["the capital of france is", "the big city is"],
        ["the capital of italy is", "the big capital is"],
        ["paris", "rome"],
        ["rome", "paris"],
        template="the {subject} is",
    )
    assert data.span_names == ("subject", OTHER)
    assert labelled(data, word_tokenizer, 0) == [
        ("<bos>", OTHER), ("the", OTHER), ("capital", "subject"), ("of", "subject"),
        ("france", "subject"), ("is", OTHER),
    ]
    assert labelled(data, word_tokenizer, 1)[2:4] == [("big", "subject"), ("city", "subject")]
    assert data.spans[1, -1] == PADDING  # padding is in no span
    # a slot takes the shortest text that lets the rest match: only the last one runs on
    late = TaskData.from_prompts(word_tokenizer, ["the capital of france is"],
                                 template="the {subject} {end}", metric="kl")
    assert [s for _, s in labelled(late, word_tokenizer)][2:] == ["subject", "end", "end", "end"]
    # "end" sits at different positions but is one span: it aligns the prompts
    ends = TaskData.from_prompts(word_tokenizer, ["the capital of france is", "the big city is"],
                                 spans=[{"end": (22, 24)}, {"end": (13, 15)}], metric="kl")
    assert (ends.spans == 0).nonzero()[:, 1].tolist() == [5, 4]


def test_character_ranges_with_a_byte_level_bpe(bpe_tokenizer):
    prompt = "The capital of France is"
    start = prompt.index("France")
    data = TaskData.from_prompts(
        bpe_tokenizer, [prompt], answers=["Paris"], wrong_answers=["Rome"],
        spans=[{"country": (start, start + len("France")), "end": [(21, 24)]}],
    )
    spans = dict((t, s) for t, s in labelled(data, bpe_tokenizer))
    # the token carries its leading space; the word alone is the span
    assert spans["ĠFrance"] == "country" and spans["Ġis"] == "end"
    assert data.span_names == ("country", "end", OTHER)


def test_template_and_range_errors_name_the_mismatch(word_tokenizer):
    prompts = ["the capital of france is", "big city is"]
    with pytest.raises(ValueError, match=r"example 1: the prompt 'big city is' does not match "
                       r"the template 'the \{subject\} \{end\}': expected the text 'the '"):
        TaskData.from_prompts(word_tokenizer, prompts, template="the {subject} {end}")
    with pytest.raises(ValueError, match="template ends at character 15 but the prompt goes on"):
        TaskData.from_prompts(word_tokenizer, ["the big city is big"],
                              template="the {subject} is")
    with pytest.raises(ValueError, match="cuts the token 'capital'"):
        TaskData.from_prompts(word_tokenizer, prompts[:1], spans=[{"x": (4, 8)}])
    with pytest.raises(ValueError, match="characters 4-99 but the prompt .* has 24"):
        TaskData.from_prompts(word_tokenizer, prompts[:1], spans=[{"x": (4, 99)}])
    with pytest.raises(ValueError, match="spans 'a' .* and 'b' .* overlap"):
        TaskData.from_prompts(word_tokenizer, prompts[:1], spans=[{"a": (0, 11), "b": (4, 14)}])
    with pytest.raises(ValueError, match="holds no token"):
        TaskData.from_prompts(word_tokenizer, ["the  city"], spans=[{"gap": (3, 4)}])
    with pytest.raises(ValueError, match="1 prompts but 2 span mappings"):
        TaskData.from_prompts(word_tokenizer, prompts[:1], spans=[{}, {}])
    with pytest.raises(ValueError, match="not both"):
        TaskData.from_prompts(word_tokenizer, prompts[:1], spans=[{}], template="{a} is")
    with pytest.raises(ValueError, match="slots {a} and {b} touch"):
        TaskData.from_prompts(word_tokenizer, prompts[:1], template="{a}{b}")
    with pytest.raises(ValueError, match="has no named slot"):
        TaskData.from_prompts(word_tokenizer, prompts[:1], template="the city")


def test_tensor_spans_are_checked():
    clean = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 4]])
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    base = {"clean": clean, "attention_mask": mask, "correct": torch.ones(2, dtype=torch.long),
            "metric": "logprob"}
    data = TaskData(**base, spans=torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]),
                    span_names=("a", "b"))
    assert data.spans[0].tolist() == [0, 1, 1, PADDING]  # padding normalised to no span
    assert data.n_spans == 2
    with pytest.raises(ValueError, match="the spans do not cover example 1: its token 2"):
        TaskData(**base, spans=torch.tensor([[0, 1, 1, 1], [0, 0, -1, 1]]), span_names=("a", "b"))
    with pytest.raises(ValueError, match="span label 2 is not one of the 2 spans"):
        TaskData(**base, spans=torch.tensor([[0, 1, 2, 1], [0, 0, 1, 1]]), span_names=("a", "b"))
    with pytest.raises(ValueError, match="without span_names"):
        TaskData(**base, spans=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="without spans"):
        TaskData(**base, span_names=("a",))
    with pytest.raises(ValueError, match=r"names \['a'\] more than once"):
        TaskData(**base, spans=torch.zeros(2, 4, dtype=torch.long), span_names=("a", "a"))
    with pytest.raises(ValueError, match=r"spans has shape \(2, 3\)"):
        TaskData(**base, spans=torch.zeros(2, 3, dtype=torch.long), span_names=("a",))


def test_spans_follow_slicing_trimming_and_devices(word_tokenizer):
    data = TaskData.from_prompts(
        word_tokenizer, ["the capital of france is", "the big city is"],
        answers=["paris", "rome"], wrong_answers=["rome", "paris"], template="the {subject} {end}",
    )
    second = data[1:].trimmed()
    assert second.clean.shape == second.spans.shape == (1, 5)
    assert second.span_names == data.span_names
    assert torch.equal(second.spans[0], data.spans[1, :5])
    assert [len(b) for b in data.batches(1)] == [1, 1]
    positions = data.with_position_spans()
    assert positions.span_names == tuple(f"p{t}" for t in range(6))
    assert positions.spans[1].tolist() == [0, 1, 2, 3, 4, PADDING]


def test_jsonl_spans_and_template(word_tokenizer, tmp_path):
    lines = [
        {"prompt": "the capital of france is", "corrupt_prompt": "the capital of italy is",
         "answer": "paris", "wrong_answer": "rome", "spans": {"country": [15, 21]}},
        {"prompt": "the big city is", "corrupt_prompt": "the big capital is",
         "answer": "rome", "wrong_answer": "paris", "spans": {"country": [[8, 12]]}},
    ]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))
    data = TaskData.from_jsonl(path, word_tokenizer)
    assert data.span_names == ("country", OTHER)
    assert labelled(data, word_tokenizer, 1)[3] == ("city", "country")
    lines[1]["spans"] = {"country": [8, 11]}
    path.write_text("\n".join(json.dumps(r) for r in lines))
    with pytest.raises(ValueError, match=r"task.jsonl, line 2: span 'country' .* cuts the token"):
        TaskData.from_jsonl(path, word_tokenizer)
    del lines[1]["spans"]
    path.write_text("\n".join(json.dumps(r) for r in lines))
    with pytest.raises(ValueError, match="line 2: no 'spans' field, but line 1 has one"):
        TaskData.from_jsonl(path, word_tokenizer)
    del lines[0]["spans"]
    path.write_text("\n".join(json.dumps(r) for r in lines))
    with pytest.raises(ValueError, match="line 2: the prompt 'the big city is' does not match"):
        TaskData.from_jsonl(path, word_tokenizer, template="the capital of {country} is")
