"""The synthetic word-level language behind ctlens's tasks and zoo models.

Every sentence is a sequence of lowercase words separated by single spaces; punctuation
(``,`` and ``.``) are words of their own, so one word is exactly one token of the shipped
WordLevel tokenizer (no leading-space tokens, no sub-words). The grammar is small but
English-like, and each sentence family carries one mechanism that a circuit can implement:

- **agreement**: ``the key to the old cabinets is ...`` / ``the keys that the man sees are ...``.
  The subject is followed by 0-2 attractors (prepositional phrases or object relative clauses
  whose nouns have a random number of their own), so neither a fixed position nor the nearest
  noun reveals the verb's number.
- **pronoun**: ``the nurse said that she ...``. Occupations are stereotyped: in the pretraining
  corpus the stereotyped pronoun follows with probability :data:`STEREOTYPE_RATE`; neutral
  occupations are 50/50.
- **ioi**: ``when mary and john went to the store , john gave a drink to mary .`` (indirect
  object identification: the answer is the name that is not repeated).
- **induction**: random word sequences repeated once (``x1 .. xL x1 .. xL``).
- **filler**: simple sentences over the same vocabulary, for general language modelling.

All samplers take an explicit :class:`random.Random`, so every sample is a deterministic
function of its seed; there is no module-level random state.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<unk>")
"""Special tokens, in id order: pad = 0, BOS = 1, unknown = 2."""

PUNCTUATION: tuple[str, ...] = (",", ".")

DEFAULT_MIXTURE: Mapping[str, float] = MappingProxyType(
    {"agreement": 0.1, "ioi": 0.3, "pronoun": 0.1, "induction": 0.3, "filler": 0.2}
)
"""Family weights of the zoo's pretraining corpus (the calibration recipe of issue 3); used by
:mod:`ctlens.tasks.corpus`, defined here so the zoo's specs read it without torch."""

NOUNS: tuple[tuple[str, str], ...] = (
    ("key", "keys"),
    ("cabinet", "cabinets"),
    ("man", "men"),
    ("woman", "women"),
    ("dog", "dogs"),
    ("cat", "cats"),
    ("boy", "boys"),
    ("girl", "girls"),
    ("table", "tables"),
    ("box", "boxes"),
    ("car", "cars"),
    ("house", "houses"),
    ("tree", "trees"),
    ("bird", "birds"),
    ("child", "children"),
    ("friend", "friends"),
    ("lamp", "lamps"),
    ("door", "doors"),
    ("chair", "chairs"),
    ("window", "windows"),
)
"""(singular, plural) noun pairs used by agreement and filler sentences."""

ADJECTIVES: tuple[str, ...] = (
    "old",
    "new",
    "red",
    "big",
    "small",
    "green",
    "dark",
    "tall",
    "young",
    "quiet",
)
A_ADJECTIVES: tuple[str, ...] = tuple(a for a in ADJECTIVES if a[0] not in "aeiou")
"""Adjectives that may follow the article ``a`` (no "a old")."""
PREPOSITIONS: tuple[str, ...] = ("to", "near", "behind", "of", "with", "under", "beside", "above")

TRANSITIVE_VERBS: tuple[tuple[str, str], ...] = (
    ("sees", "see"),
    ("likes", "like"),
    ("finds", "find"),
    ("owns", "own"),
    ("wants", "want"),
    ("knows", "know"),
)
"""(3rd-person singular, plural) transitive verbs, used inside relative clauses and fillers."""

AGREEMENT_VERBS: tuple[tuple[str, str], ...] = (("is", "are"), ("was", "were"), ("has", "have"))
"""(singular, plural) main verbs whose form the agreement task asks for."""

FEMALE_OCCUPATIONS: tuple[str, ...] = (
    "nurse",
    "secretary",
    "dancer",
    "nanny",
    "hairdresser",
    "receptionist",
)
MALE_OCCUPATIONS: tuple[str, ...] = (
    "engineer",
    "pilot",
    "mechanic",
    "soldier",
    "plumber",
    "carpenter",
)
NEUTRAL_OCCUPATIONS: tuple[str, ...] = ("doctor", "writer", "teacher", "lawyer", "artist", "chef")
ALL_OCCUPATIONS: tuple[str, ...] = FEMALE_OCCUPATIONS + MALE_OCCUPATIONS + NEUTRAL_OCCUPATIONS
STEREOTYPE_RATE: float = 0.9
"""Probability that a stereotyped occupation is followed by its stereotyped pronoun."""

NAMES: tuple[str, ...] = (
    "mary",
    "john",
    "anna",
    "paul",
    "lisa",
    "mark",
    "sarah",
    "david",
    "emma",
    "james",
    "kate",
    "tom",
    "laura",
    "peter",
    "julia",
    "alex",
    "nina",
    "sam",
    "rose",
    "leo",
)
PLACES: tuple[str, ...] = (
    "store",
    "park",
    "school",
    "garden",
    "station",
    "market",
    "beach",
    "office",
    "library",
    "cafe",
)
OBJECTS: tuple[str, ...] = (
    "drink",
    "book",
    "ball",
    "letter",
    "gift",
    "ring",
    "cake",
    "flower",
    "pen",
    "bag",
)

IOI_TEMPLATES: tuple[str, ...] = (
    "when {a} and {b} went to the {place} , {s} gave a {obj} to",
    "then {a} and {b} met at the {place} , and {s} handed the {obj} to",
    "after {a} and {b} arrived at the {place} , {s} sent a {obj} to",
    "while {a} and {b} were at the {place} , {s} passed the {obj} to",
)
"""IOI prompt templates; ``{s}`` (the subject) repeats one of ``{a}``/``{b}``."""

PRONOUN_TEMPLATES: tuple[str, ...] = (
    "the {occ} said that",
    "the {occ} went home because",
    "the {occ} was happy because",
    "the {occ} smiled when",
)
PRONOUN_CONTINUATIONS: tuple[str, ...] = (
    "was tired .",
    "was late .",
    "liked the work .",
    "saw the dog .",
    "had a book .",
    "was at the park .",
)
PREDICATES: tuple[str, ...] = (
    "on the table .",
    "in the house .",
    "here .",
    "old .",
    "small .",
    "near the door .",
)
"""What follows ``is``/``are``/``was``/``were`` in agreement sentences."""

PRONOUNS: tuple[str, ...] = ("she", "he")

FUNCTION_WORDS: tuple[str, ...] = (
    "the",
    "a",
    "that",
    "and",
    "when",
    "then",
    "after",
    "while",
    "went",
    "met",
    "at",
    "arrived",
    "were",
    "gave",
    "handed",
    "sent",
    "passed",
    "said",
    "home",
    "because",
    "happy",
    "smiled",
    "tired",
    "late",
    "liked",
    "work",
    "saw",
    "had",
    "in",
    "on",
    "here",
    "near",
    "is",
    "are",
    "was",
    "has",
    "have",
    "she",
    "he",
    "door",
    "table",
    "house",
    "dog",
    "book",
    "park",
)


def vocabulary() -> list[str]:
    """All words of the language, in token-id order (specials first, no duplicates).

    The order is fixed by the tuples above, so the tokenizer built from it is stable.
    """
    words: list[str] = [*SPECIAL_TOKENS, *PUNCTUATION]
    groups: list[tuple[str, ...]] = [
        FUNCTION_WORDS,
        tuple(w for pair in NOUNS for w in pair),
        ADJECTIVES,
        PREPOSITIONS,
        tuple(w for pair in TRANSITIVE_VERBS for w in pair),
        tuple(w for pair in AGREEMENT_VERBS for w in pair),
        FEMALE_OCCUPATIONS,
        MALE_OCCUPATIONS,
        NEUTRAL_OCCUPATIONS,
        NAMES,
        PLACES,
        OBJECTS,
        PRONOUNS,
    ]
    for text in (*IOI_TEMPLATES, *PRONOUN_TEMPLATES, *PRONOUN_CONTINUATIONS, *PREDICATES):
        groups.append(tuple(w for w in text.split() if not w.startswith("{")))
    seen = set(words)
    for group in groups:
        for word in group:
            if word not in seen:
                seen.add(word)
                words.append(word)
    return words


CONTENT_WORDS: tuple[str, ...] = tuple(
    w for w in vocabulary() if w not in SPECIAL_TOKENS and w not in PUNCTUATION
)
"""Words that induction sequences are drawn from (everything but specials and punctuation)."""


@dataclass(frozen=True)
class Example:
    """One task sentence split for evaluation and training.

    ``prompt`` ends right before the answer; ``corrupt`` has the same length and differs in
    the task-relevant word(s); ``target`` is the word that follows the prompt in training
    text when it is not ``answer`` (pronoun examples sample it from the corpus statistics);
    ``rest`` is the rest of the sentence after it. ``group`` records a property that
    evaluations group by (the occupation for pronoun examples, ``"sg"``/``"pl"`` for
    agreement, else empty). ``roles`` names the role of each prompt word (``"subject"``,
    ``"io"``, ...; ``""`` for none): the token spans of positional circuits
    (`ctlens.tasks.generators.SPANS` adds ``"end"``, the last word, and ``"other"``).
    """

    prompt: tuple[str, ...]
    corrupt: tuple[str, ...]
    answer: str
    wrong: str
    rest: tuple[str, ...] = ()
    group: str = ""
    target: str | None = None
    roles: tuple[str, ...] = ()

    def next_word(self) -> str:
        """The word that follows the prompt in the clean sentence."""
        return self.answer if self.target is None else self.target

    def sentence(self) -> list[str]:
        """The full clean sentence: prompt, next word, rest."""
        return [*self.prompt, self.next_word(), *self.rest]


def _noun_phrase(rng: random.Random, plural: bool, noun: int | None = None) -> list[str]:
    """``the [adjective] noun`` with the given number (random noun unless given)."""
    pair = NOUNS[rng.randrange(len(NOUNS)) if noun is None else noun]
    words = ["the"]
    if rng.random() < 0.4:
        words.append(rng.choice(ADJECTIVES))
    words.append(pair[1] if plural else pair[0])
    return words


def _attractor(rng: random.Random) -> list[str]:
    """A prepositional phrase or object relative clause with its own noun number."""
    plural = rng.random() < 0.5
    if rng.random() < 0.6:
        return [rng.choice(PREPOSITIONS), *_noun_phrase(rng, plural)]
    verb = rng.choice(TRANSITIVE_VERBS)
    return ["that", *_noun_phrase(rng, plural), verb[1] if plural else verb[0]]


def agreement_example(rng: random.Random, max_attractors: int = 2) -> Example:
    """Subject + 0..``max_attractors`` attractors; answer is the verb agreeing with the subject.

    The corrupt prompt is the same prompt with the subject's number flipped (same length,
    because both forms are single words), so the answers swap roles.
    """
    plural = rng.random() < 0.5
    noun = rng.randrange(len(NOUNS))
    subject = _noun_phrase(rng, plural, noun)
    attractors: list[str] = []
    for _ in range(rng.randint(0, max_attractors)):
        attractors += _attractor(rng)
    flipped = [*subject[:-1], NOUNS[noun][0] if plural else NOUNS[noun][1]]
    verb = rng.choice(AGREEMENT_VERBS)
    answer, wrong = (verb[1], verb[0]) if plural else (verb[0], verb[1])
    if verb[0] == "has":
        rest: list[str] = ["a", rng.choice(A_ADJECTIVES), rng.choice(OBJECTS), "."]
    else:
        rest = rng.choice(PREDICATES).split()
    return Example(
        prompt=tuple(subject + attractors),
        corrupt=tuple(flipped + attractors),
        answer=answer,
        wrong=wrong,
        rest=tuple(rest),
        group="pl" if plural else "sg",
        roles=("subject",) * len(subject) + ("attractor",) * len(attractors),
    )


def stereotype(occupation: str) -> str | None:
    """The stereotyped pronoun of an occupation (``"she"``/``"he"``), or None if neutral."""
    if occupation in FEMALE_OCCUPATIONS:
        return "she"
    if occupation in MALE_OCCUPATIONS:
        return "he"
    if occupation in NEUTRAL_OCCUPATIONS:
        return None
    raise ValueError(
        f"unknown occupation {occupation!r}; known: "
        f"{', '.join(FEMALE_OCCUPATIONS + MALE_OCCUPATIONS + NEUTRAL_OCCUPATIONS)}"
    )


def pronoun_example(
    rng: random.Random,
    occupation: str | None = None,
    she_rate: float | None = None,
) -> Example:
    """``the OCC [pp] said that`` -> pronoun; answer ``she``, wrong ``he`` (metric she - he).

    ``occupation`` defaults to a random stereotyped one. The pronoun that follows in training
    text (:attr:`Example.target`) is ``she`` with probability ``she_rate``, by default the
    corpus statistics (:data:`STEREOTYPE_RATE` towards the stereotype, 0.5 for neutral
    occupations). The
    corrupt prompt swaps in an occupation of the opposite stereotype (a neutral one for
    neutral occupations).
    """
    if occupation is None:
        occupation = rng.choice(FEMALE_OCCUPATIONS + MALE_OCCUPATIONS)
    stereo = stereotype(occupation)
    if she_rate is None:
        she_rate = (
            0.5 if stereo is None else (STEREOTYPE_RATE if stereo == "she" else 1 - STEREOTYPE_RATE)
        )
    if stereo == "she":
        other = rng.choice(MALE_OCCUPATIONS)
    elif stereo == "he":
        other = rng.choice(FEMALE_OCCUPATIONS)
    else:
        other = rng.choice([o for o in NEUTRAL_OCCUPATIONS if o != occupation])
    template = rng.choice(PRONOUN_TEMPLATES)
    pp: list[str] = []
    if rng.random() < 0.3:
        pp = [rng.choice(PREPOSITIONS), *_noun_phrase(rng, rng.random() < 0.5)]
    words = template.split()
    clean = [occupation if w == "{occ}" else w for w in words]
    corrupt = [other if w == "{occ}" else w for w in words]
    clean = clean[:2] + pp + clean[2:]
    corrupt = corrupt[:2] + pp + corrupt[2:]
    roles = tuple("occupation" if i == 1 else "" for i in range(len(clean)))  # "the {occ} .."
    pronoun = "she" if rng.random() < she_rate else "he"
    return Example(
        prompt=tuple(clean),
        corrupt=tuple(corrupt),
        answer="she",
        wrong="he",
        rest=tuple(rng.choice(PRONOUN_CONTINUATIONS).split()),
        group=occupation,
        target=pronoun,
        roles=roles,
    )


def ioi_example(rng: random.Random) -> Example:
    """An IOI sentence; answer = indirect object (the unrepeated name), wrong = subject.

    Both name orders (ABBA and BABA) occur. The corrupt prompt replaces the repeated subject
    with a third name (the usual "ABC" corruption), which removes the repetition cue.
    """
    io, s, c = rng.sample(NAMES, 3)
    a, b = (io, s) if rng.random() < 0.5 else (s, io)
    template = rng.choice(IOI_TEMPLATES)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    clean = template.format(a=a, b=b, s=s, place=place, obj=obj).split()
    corrupt = template.format(a=a, b=b, s=c, place=place, obj=obj).split()
    slot_role = {"{a}": "io" if a == io else "s1", "{b}": "io" if b == io else "s1", "{s}": "s2"}
    roles = tuple(slot_role.get(word, "") for word in template.split())
    return Example(
        prompt=tuple(clean), corrupt=tuple(corrupt), answer=io, wrong=s, rest=(".",), roles=roles
    )


def induction_sequence(rng: random.Random, length: int) -> list[str]:
    """``length`` distinct random content words (one half of an induction example)."""
    if not 1 <= length <= len(CONTENT_WORDS):
        raise ValueError(f"induction length must be in 1..{len(CONTENT_WORDS)}, got {length}")
    return rng.sample(CONTENT_WORDS, length)


def filler_sentence(rng: random.Random) -> list[str]:
    """A simple sentence over the shared vocabulary (general language modelling)."""
    kind = rng.randrange(5)
    if kind == 0:
        plural = rng.random() < 0.5
        verb = rng.choice(TRANSITIVE_VERBS)
        return [
            *_noun_phrase(rng, plural),
            verb[1] if plural else verb[0],
            *_noun_phrase(rng, rng.random() < 0.5),
            ".",
        ]
    if kind == 1:
        return [rng.choice(NAMES), "went", "to", "the", rng.choice(PLACES), "."]
    if kind == 2:
        return [rng.choice(NAMES), "had", "a", rng.choice(A_ADJECTIVES), rng.choice(OBJECTS), "."]
    if kind == 3:
        occ = rng.choice(ALL_OCCUPATIONS)
        return ["the", occ, "saw", *_noun_phrase(rng, rng.random() < 0.5), "."]
    plural = rng.random() < 0.5
    return [*_noun_phrase(rng, plural), "and", *_noun_phrase(rng, plural), "were", "here", "."]
