"""The word-level tokenizer of the synthetic language (shipped as ``tokenizer.json``).

A ``tokenizers`` WordLevel model over :func:`ctlens.tasks.language.vocabulary`, split on
whitespace, with a TemplateProcessing post-processor that prepends ``<bos>``. Words are whole
tokens (no leading-space variants), so an answer tokenizes to the same single id whether or
not it follows a prompt. Decoding joins tokens with single spaces.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from ctlens.tasks.language import SPECIAL_TOKENS, vocabulary

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

TOKENIZER_PATH: Path = Path(__file__).with_name("tokenizer.json")
"""The shipped tokenizer file (regenerate with :func:`write_tokenizer` if the language changes)."""

PAD, BOS, UNK = SPECIAL_TOKENS


def build_tokenizer() -> Tokenizer:
    """Build the raw ``tokenizers.Tokenizer`` from the language's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos_id = vocab[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    tok.add_special_tokens([PAD, BOS, UNK])
    return tok


def write_tokenizer(path: Path = TOKENIZER_PATH) -> Path:
    """Write the tokenizer JSON (used to (re)generate the shipped file)."""
    build_tokenizer().save(str(path))
    return path


def wrap(tokenizer_file: Path | str) -> PreTrainedTokenizerFast:
    """Wrap a tokenizer JSON of this language as a transformers fast tokenizer.

    ``add_bos_token=True`` and ``name_or_path`` are recorded because TransformerLens reads
    them when it attaches the tokenizer to a bridge (the post-processor already adds BOS,
    exactly once).
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(tokenizer_file)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        name_or_path=str(path.parent),
        bos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


@cache
def _shipped() -> PreTrainedTokenizerFast:
    return wrap(TOKENIZER_PATH)


def tokenizer() -> PreTrainedTokenizerFast:
    """The shipped tokenizer as a ``PreTrainedTokenizerFast`` (BOS prepended, right padding).

    A fresh copy each call (callers may change settings such as the padding side).
    """
    import copy

    return copy.deepcopy(_shipped())


@cache
def word_to_id() -> Mapping[str, int]:
    """Word -> token id (identical to the tokenizer's vocabulary), read-only."""
    return MappingProxyType({word: i for i, word in enumerate(vocabulary())})


def encode_words(words: list[str] | tuple[str, ...]) -> list[int]:
    """Token ids of a list of words, without BOS; unknown words raise a ``ValueError``."""
    table = word_to_id()
    try:
        return [table[w] for w in words]
    except KeyError as err:
        raise ValueError(
            f"word {err.args[0]!r} is not in the ctlens task vocabulary; see "
            "ctlens.tasks.language.vocabulary() for the known words"
        ) from None
