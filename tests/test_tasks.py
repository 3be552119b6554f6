"""Tests of ctlens.tasks: the language, tokenizer, generators, Task bundles and JSONL loading."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

import ctlens.tasks as tasks
from ctlens.data import TaskData
from ctlens.tasks import generators, language
from ctlens.tasks.corpus import DEFAULT_MIXTURE, sample_rows, segment
from ctlens.tasks.tokenizer import TOKENIZER_PATH, build_tokenizer, encode_words, word_to_id

SMALL = {"n": 24, "n_train": 48, "n_general": 8}


@pytest.fixture(scope="module")
def tok():
    return tasks.tokenizer()


# ---------------------------------------------------------------- tokenizer


def test_shipped_tokenizer_matches_language():
    shipped = json.loads(TOKENIZER_PATH.read_text())
    assert shipped == json.loads(build_tokenizer().to_str()), (
        "ctlens/tasks/tokenizer.json is stale: regenerate it with "
        "ctlens.tasks.tokenizer.write_tokenizer()"
    )


def test_tokenizer_bos_pad_and_word_level(tok):
    vocab = language.vocabulary()
    assert len(set(vocab)) == len(vocab)
    assert tok.bos_token == "<bos>" and tok.pad_token == "<pad>"
    ids = tok("the keys that the man sees are")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:]) == [
        "the",
        "keys",
        "that",
        "the",
        "man",
        "sees",
        "are",
    ]
    assert tok.decode(ids, skip_special_tokens=True) == "the keys that the man sees are"
    # every word is exactly one token, with or without a preceding prompt (no leading spaces)
    for word in vocab[3:]:
        assert tok(word, add_special_tokens=False)["input_ids"] == [word_to_id()[word]]
    assert not any(w.startswith((" ", "Ġ", "▁")) for w in vocab)
    batch = tok(["mary", "the old key is"], padding=True)
    assert batch["input_ids"][0][2:] == [tok.pad_token_id] * 3
    assert batch["attention_mask"][0] == [1, 1, 0, 0, 0]


def test_encode_words_rejects_unknown_word():
    with pytest.raises(ValueError, match="'zebra' is not in the ctlens task vocabulary"):
        encode_words(["the", "zebra"])


def test_from_prompts_with_task_tokenizer(tok):
    data = TaskData.from_prompts(
        tok, ["the key near the doors"], ["the keys near the doors"], ["is"], ["are"]
    )
    assert data.correct.tolist() == [word_to_id()["is"]]
    assert data.clean[0, 0] == tok.bos_token_id
    with pytest.raises(ValueError, match="one token"):
        TaskData.from_prompts(tok, ["the key"], ["the keys"], ["is here"], ["are"])


# ---------------------------------------------------------------- generators


def test_generators_deterministic_and_seeded():
    for name, gen in generators.GENERATORS.items():
        a, b, c = gen(16, 3), gen(16, 3), gen(16, 4)
        assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt), name
        assert not torch.equal(a.clean, c.clean), name
        d = gen(16, 3, "train")
        assert not torch.equal(a.clean[:, :4], d.clean[:, :4]), f"{name}: streams not disjoint"


def test_agreement_answers_follow_subject_number():
    singular = {s for s, _ in language.NOUNS}
    plural = {p for _, p in language.NOUNS}
    sg_verbs = {s for s, _ in language.AGREEMENT_VERBS}
    rng = random.Random(0)
    distances = Counter()
    for _ in range(300):
        ex = language.agreement_example(rng)
        subject = next(w for w in ex.prompt[1:3] if w in singular | plural)
        assert (ex.answer in sg_verbs) == (subject in singular)
        assert {ex.answer, ex.wrong} in [set(p) for p in language.AGREEMENT_VERBS]
        diff = [i for i, (a, b) in enumerate(zip(ex.prompt, ex.corrupt, strict=True)) if a != b]
        assert len(diff) == 1 and ex.prompt[diff[0]] == subject
        distances[len(ex.prompt) - diff[0]] += 1
        # the last noun of an attractor often has the other number (an attractor, not a cue)
    # the subject sits at many distances from the verb: no fixed position reveals it
    assert len(distances) >= 6
    batch = generators.agreement(64, 0)
    assert (batch.clean != batch.corrupt).sum(1).eq(1).all()


def test_agreement_has_mismatched_attractors():
    rng = random.Random(1)
    singular = {s for s, _ in language.NOUNS}
    plural = {p for _, p in language.NOUNS}
    mismatched = 0
    for _ in range(200):
        ex = language.agreement_example(rng)
        nouns = [w for w in ex.prompt if w in singular | plural]
        if len(nouns) > 1 and (nouns[0] in singular) != (nouns[-1] in singular):
            mismatched += 1
    assert mismatched > 30


def test_pronoun_examples_and_corpus_statistics():
    batch = generators.pronoun(48, 0)
    she, he = word_to_id()["she"], word_to_id()["he"]
    assert (batch.correct == she).all() and (batch.wrong == he).all()
    assert set(batch.groups) == set(language.FEMALE_OCCUPATIONS + language.MALE_OCCUPATIONS)
    tok = tasks.tokenizer()
    for i in range(8):
        clean = tok.convert_ids_to_tokens(batch.clean[i])
        corrupt = tok.convert_ids_to_tokens(batch.corrupt[i])
        occ, other = clean[2], corrupt[2]
        assert occ == batch.groups[i]
        assert language.stereotype(other) not in (None, language.stereotype(occ))
    # in the pretraining corpus the stereotyped pronoun follows ~90 % of the time
    rng = random.Random(0)
    hits = Counter()
    for _ in range(3000):
        ex = language.pronoun_example(rng)
        hits[ex.target == language.stereotype(ex.group)] += 1
    assert 0.87 < hits[True] / 3000 < 0.93
    neutral = [language.pronoun_example(rng, "doctor").target for _ in range(1000)]
    assert 0.45 < neutral.count("she") / 1000 < 0.55


def test_ioi_structure():
    rng = random.Random(0)
    for _ in range(100):
        ex = language.ioi_example(rng)
        counts = Counter(w for w in ex.prompt if w in language.NAMES)
        assert counts[ex.answer] == 1 and counts[ex.wrong] == 2
        corrupt_names = Counter(w for w in ex.corrupt if w in language.NAMES)
        assert len(corrupt_names) == 3 and all(c == 1 for c in corrupt_names.values())
    batch = generators.ioi(32, 0)
    assert (batch.correct != batch.wrong).all()


def test_induction_batch():
    batch = generators.induction(8, 0, length=10)
    assert batch.clean.shape == (8, 21) and batch.positions.shape == (8, 9)
    first, second = batch.clean[:, 1:11], batch.clean[:, 11:]
    assert torch.equal(first, second)
    assert torch.equal(batch.correct, batch.clean[:, 12:21])
    assert torch.equal(batch.corrupt[:, 11:], second)  # same tokens at the scored positions
    for row in batch.corrupt:
        assert not set(row[11:].tolist()) & set(row[1:11].tolist())  # nothing repeats
    assert batch.metric == "logprob" and batch.wrong is None
    with pytest.raises(ValueError, match="length"):
        generators.induction(2, 0, length=1)


def test_corpus_rows_mixture():
    rows = sample_rows(random.Random(0), 200, 64)
    assert rows.shape == (200, 64) and (rows[:, 0] == word_to_id()["<bos>"]).all()
    assert not (rows == word_to_id()["<pad>"]).any()
    assert torch.equal(rows, sample_rows(random.Random(0), 200, 64))
    assert abs(sum(DEFAULT_MIXTURE.values()) - 1) < 1e-9
    half = segment("induction", random.Random(2))
    assert half[: len(half) // 2] == half[len(half) // 2 :]
    with pytest.raises(ValueError, match="unknown mixture families"):
        sample_rows(random.Random(0), 2, 16, {"poetry": 1.0})


@pytest.mark.parametrize("family", ["agreement", "pronoun", "ioi", "filler"])
def test_article_a_never_precedes_a_vowel(family):
    """English-like means no "a apple" or "a old" in any sentence family."""
    rng = random.Random(7)
    for _ in range(2000):
        words = segment(family, rng)
        for article, word in zip(words, words[1:], strict=False):
            assert not (article == "a" and word[0] in "aeiou"), " ".join(words)


# ---------------------------------------------------------------- Task bundles


@pytest.mark.parametrize("name", tasks.names())
def test_load_every_task(name):
    task = tasks.load(name, seed=0, **SMALL)
    again = tasks.load(name, seed=0, **SMALL)
    assert torch.equal(task.discovery.clean, again.discovery.clean)
    assert torch.equal(task.train_tokens, again.train_tokens)
    assert task.name == name and task.description
    assert isinstance(task.discovery, TaskData) and len(task.discovery) == SMALL["n"]
    assert task.train_tokens.shape[0] == SMALL["n_train"]
    assert task.train_target_mask.dtype == torch.bool
    # targets only on real tokens, never on the first column, at least one per row
    assert not (task.train_target_mask & ~task.train_attention_mask).any()
    assert not task.train_target_mask[:, 0].any()
    assert task.train_target_mask.any(1).all()
    assert {"agreement", "ioi", "pronoun", "induction"} <= set(task.evals)
    assert task.target_eval in task.evals
    assert task.general_tokens is not None and task.general_tokens.shape == (8, 64)
    # train_data reads its metric exactly where the targets are predicted
    td = task.train_data
    assert td is not None
    pos = td.positions_2d + 1
    rows = torch.arange(len(td))[:, None]
    assert task.train_target_mask[rows, pos].all()
    assert torch.equal(task.train_tokens[rows, pos], td.correct.reshape(len(td), -1))
    assert not torch.equal(task.discovery.clean, task.evals[task.target_eval].clean)


def test_agreement_flip_targets_wrong_verb():
    plain = tasks.load("agreement", seed=5, **SMALL)
    flip = tasks.load("agreement-flip", seed=5, **SMALL)
    assert torch.equal(flip.discovery.correct, plain.discovery.wrong)
    assert torch.equal(flip.discovery.wrong, plain.discovery.correct)
    assert torch.equal(flip.evals["agreement-flip"].correct, plain.evals["agreement"].wrong)
    tok = tasks.tokenizer()
    sg = {s for s, _ in language.NOUNS}
    for row, mask in zip(flip.train_tokens, flip.train_target_mask, strict=True):
        words = tok.convert_ids_to_tokens(row)
        verb = words[int(mask.nonzero()[0, 0])]
        subject = next(w for w in words[2:4] if w in sg or w in {p for _, p in language.NOUNS})
        singular_verb = verb in {s for s, _ in language.AGREEMENT_VERBS}
        assert singular_verb != (subject in sg), f"{words}: target verb agrees"


def test_pronoun_debias_balanced_and_zero_objective():
    task = tasks.load("pronoun-debias", n=24, n_train=600, n_general=8)
    assert task.objective == "zero" and task.target_eval == "pronoun-debias"
    targets = task.train_tokens[task.train_target_mask]
    she = (targets == word_to_id()["she"]).float().mean()
    assert set(targets.tolist()) == {word_to_id()["she"], word_to_id()["he"]}
    assert 0.45 < float(she) < 0.55
    stereo = tasks.load("pronoun", n=24, n_train=600, n_general=8)
    assert stereo.objective == "maximize"


def test_task_is_frozen_and_validated():
    task = tasks.load("ioi", **SMALL)
    with pytest.raises(AttributeError):
        task.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        task.evals["new"] = task.discovery  # type: ignore[index]


def test_unknown_task_lists_names():
    with pytest.raises(ValueError, match="built-in tasks: agreement, agreement-flip"):
        tasks.load("sentiment")
    with pytest.raises(ValueError, match="n must be positive"):
        tasks.load("ioi", n=0)
    assert tasks.load("ioi", tokenizer=tasks.tokenizer(), **SMALL).name == "ioi"


def test_builtin_task_rejects_foreign_tokenizer():
    class Foreign:
        def get_vocab(self) -> dict[str, int]:
            return {"hello": 0}

    with pytest.raises(ValueError, match="another one"):
        tasks.load("ioi", tokenizer=Foreign())


# ---------------------------------------------------------------- JSONL


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


GOOD = [
    {
        "prompt": "the key near the doors",
        "corrupt_prompt": "the keys near the doors",
        "answer": "is",
        "wrong_answer": "are",
    },
    {
        "prompt": "the nurse said that",
        "corrupt_prompt": "the pilot said that",
        "answer": "she",
        "wrong_answer": "he",
    },
]


def test_jsonl_task_loads(tmp_path, tok):
    task = tasks.load(str(_write(tmp_path / "mine.jsonl", GOOD)), tokenizer=tok)
    assert task.name == "mine" and task.target_eval == "mine"
    assert len(task.discovery) == 2
    assert task.discovery.correct.tolist() == encode_words(["is", "she"])
    # training rows: prompt + answer, target at the answer
    assert task.train_tokens[task.train_target_mask].tolist() == encode_words(["is", "she"])
    td = task.train_data
    assert torch.equal(task.train_tokens[torch.arange(2), td.positions + 1], td.correct)
    width = task.discovery.clean.shape[1]
    prompt_part = task.train_tokens[:, :width]
    assert torch.equal(
        prompt_part[task.discovery.attention_mask],
        task.discovery.clean[task.discovery.attention_mask],
    )
    assert {"agreement", "ioi"} <= set(task.evals)  # zoo tokenizer: built-in evals attached
    assert task.general_tokens is not None


def test_jsonl_errors_name_the_line(tmp_path, tok):
    missing = [GOOD[0], {"prompt": "the key", "answer": "is", "wrong_answer": "are"}]
    with pytest.raises(ValueError, match=r"line 2: missing field\(s\) \['corrupt_prompt'\]"):
        tasks.load(str(_write(tmp_path / "a.jsonl", missing)), tokenizer=tok)
    multi = [GOOD[0], GOOD[1], {**GOOD[0], "answer": "is here"}]
    with pytest.raises(ValueError, match="line 3: .*one token"):
        tasks.load(str(_write(tmp_path / "b.jsonl", multi)), tokenizer=tok)
    unknown = [GOOD[0], {**GOOD[1], "prompt": "the zebra said that"}]
    with pytest.raises(ValueError, match="line 2: a word is not in the tokenizer's vocabulary"):
        tasks.load(str(_write(tmp_path / "c.jsonl", unknown)), tokenizer=tok)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        tasks.load(str(tmp_path / "a.jsonl"))
