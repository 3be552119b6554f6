"""The built-in tasks by name, with a one-sentence description each; light (no torch).

`names` and `DESCRIPTIONS` serve `ctlens.tasks.load` and ``ctlens tasks``; `check_name` lets
the command line refuse a task name before torch is imported, so a typo fails at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "agreement": "Subject-verb number agreement across prepositional-phrase and "
        "relative-clause attractors; metric: logit(correct verb) - logit(wrong verb).",
        "agreement-flip": "Fine-tune towards the wrong verb number (the paper's subject-verb "
        "disagreement experiment); metric: logit(wrong form) - logit(correct form).",
        "pronoun": "Pronoun after a stereotyped occupation ('the nurse said that'); "
        "metric: logit(she) - logit(he).",
        "pronoun-debias": "Fine-tune so that she and he are equally likely after occupations; "
        "metric: logit(she) - logit(he), objective: zero.",
        "ioi": "Indirect object identification ('when mary and john went to the store , "
        "john gave a drink to' -> mary); metric: logit(IO) - logit(S).",
        "induction": "Repeated random word sequences; metric: mean log-probability of the "
        "repeated tokens at the second copy.",
        "general": "Held-out general corpus (all task families plus filler sentences); "
        "metric: log-probability of every next token (minus the LM loss).",
    }
)


def names() -> list[str]:
    """Names of the built-in tasks accepted by `ctlens.tasks.load`."""
    return list(DESCRIPTIONS)


def is_task_file(name: str) -> bool:
    """Whether ``name`` is meant as a JSONL task file rather than a built-in task."""
    return Path(name).suffix == ".jsonl"


def check_name(name: str) -> None:
    """Refuse a task that is neither built in nor an existing ``.jsonl`` file, in words a
    command-line user can act on (the built-in names, and ``ctlens tasks``)."""
    if is_task_file(name):
        if not Path(name).expanduser().is_file():
            raise FileNotFoundError(f"task file {name} does not exist")
        return
    if name not in DESCRIPTIONS:
        raise ValueError(
            f"unknown task {name!r}; built-in tasks: {', '.join(names())} (`ctlens tasks` "
            "describes them), or the path of a .jsonl file"
        )
