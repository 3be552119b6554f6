"""``ctlens tasks``: the built-in tasks, one line each (name and what it asks of the model).

Light: reads `ctlens.tasks.catalog` only, so it answers without loading torch.
"""

from __future__ import annotations

import argparse
from typing import Any


def run_tasks(args: argparse.Namespace) -> int:
    """Print every built-in task's name and description, one line each."""
    from ctlens.tasks.catalog import DESCRIPTIONS

    width = max(map(len, DESCRIPTIONS))
    for name, description in DESCRIPTIONS.items():
        print(f"{name:<{width}}  {description}")
    return 0


def add_tasks_command(subparsers: Any) -> None:
    """Register ``tasks`` under an argparse sub-parser collection."""
    tasks = subparsers.add_parser(
        "tasks",
        help="list the built-in tasks (for --task), one line each",
        description="List the built-in tasks that discover and tune accept as --task, with "
        "what each asks of the model and its metric. --task also takes a JSONL file of your "
        "own (fields prompt, corrupt_prompt, answer, wrong_answer).",
    )
    tasks.set_defaults(func=run_tasks)
