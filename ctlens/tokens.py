"""How prompt text becomes token ids for `ctlens.TaskData.from_prompts` (DESIGN.md rules).

Prompts get the tokenizer's usual BOS handling; an answer is tokenized as the continuation of
its prompt and must be one token; a word the tokenizer does not know (it would become the
unknown token) is refused. Errors about one example are `UnitError`s, which
`TaskData.from_jsonl` rewrites to name the file line.
"""

from __future__ import annotations

from typing import Any


class UnitError(ValueError):
    """An error about example ``index``; `from_jsonl` rewrites it to name the file line."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"example {index}: {message}")
        self.index = index
        self.message = message


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def answer_id(tokenizer: Any, prompt: str, answer: str, index: int, unk: int | None) -> int:
    """The single token that continues ``prompt`` with ``answer`` (``unk``: see
    `unknown_token_id`)."""
    text = answer if answer[:1].isspace() else " " + answer
    prompt_ids = _encode(tokenizer, prompt)
    full_ids = _encode(tokenizer, prompt + text)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and full_ids and full_ids[-1] == eos and prompt_ids[-1:] == [eos]:
        prompt_ids, full_ids = prompt_ids[:-1], full_ids[:-1]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        continuation = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        continuation = full_ids[len(prompt_ids) :]
    if len(continuation) != 1:
        pieces = [tokenizer.decode([t]) for t in continuation]
        raise UnitError(
            index,
            f"answer {answer!r} is {len(continuation)} tokens {pieces} after its prompt; "
            "answers must be exactly one token",
        )
    if unk is not None and continuation[0] == unk:
        raise UnitError(index, unknown_word_message(tokenizer, answer.strip(), "answer", answer))
    return int(continuation[0])


#: A made-up word of rare characters: a tokenizer that can map text to its unknown token
#: maps this to it (word-level and character-level vocabularies); a byte-level BPE cannot.
_UNKNOWN_PROBE = "qzxj\u2603\u0f3a\U0001d54f"


def unknown_token_id(tokenizer: Any) -> int | None:
    """The id unknown words map to, when the tokenizer can produce one at all.

    Asked of the tokenizer itself, by encoding `_UNKNOWN_PROBE`, not guessed from its special
    ids: the zoo's word-level tokenizer maps unknown words to ``<unk>`` even when a
    TransformerLens bridge has made that id its EOS too, while GPT-2's byte-level BPE names
    ``<|endoftext|>`` (its BOS/EOS) as ``unk`` but never produces it for a word.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None
    probe = tokenizer(_UNKNOWN_PROBE, add_special_tokens=False)["input_ids"]
    return int(unk) if unk in probe else None


def encode_known(tokenizer: Any, text: str, unk: int | None, index: int, what: str) -> list[int]:
    """`_encode`, refusing a text with a word the tokenizer does not know.

    Only the text's own tokens count: ``unk`` may also be a special token the tokenizer adds
    (a BOS or EOS sharing its id).
    """
    ids = _encode(tokenizer, text)
    if unk is not None and unk in ids and unk in _own_ids(tokenizer, text):
        word = next((w for w in text.split() if unk in _own_ids(tokenizer, w)), text)
        raise UnitError(index, unknown_word_message(tokenizer, word, what, text))
    return ids


def _own_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids of ``text`` alone, without the special tokens the tokenizer adds."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def unknown_word_message(tokenizer: Any, word: str, what: str, text: str) -> str:
    unk_name = getattr(tokenizer, "unk_token", "<unk>")
    return (
        f"a word is not in the tokenizer's vocabulary: {word!r} in the {what} {text!r} would "
        f"become {unk_name!r} (silently changing the task; two prompts that differ only "
        "there become equal and score 0); use only words the tokenizer knows"
    )
