"""The ``ctlens`` command line: assembles the sub-commands and runs one.

Adding a sub-command is one line in `COMMANDS`: ``"package.module:add_x_command"``, a
function that takes argparse's sub-parser collection, adds its parser and sets ``func``
(called with the parsed namespace, returns an exit status). Every command module is imported
to build the parser, ``ctlens --help`` included, so it must import no torch, plotly or
transformers at module level: put the implementation in functions that import what they
need, or in another module named by ``func=lazy_runner("package.module:run_x")``
(`ctlens.cli.support`). ``tests/test_cli.py`` checks that no ``--help`` loads torch.

What `main` does for every command, so that each one behaves the same:

- names first: a parser's ``set_defaults(check=f)`` runs ``f(args)`` before anything else,
  and before torch is imported, so a wrong model or task name fails in one line at once;
- help: every option's default is said once (`ctlens.cli.support.HelpFormatter`);
- ``--threads`` (where a command has it, otherwise the default): torch's CPU threads, see
  `ctlens.cli.support.default_threads`;
- ``--device``: refused at once when torch cannot use it here (no CUDA, say);
- ``--out``: when the parser declares ``set_defaults(out_kind="file")`` (or ``"dir"``), the
  path is checked for its kind and for being writable before any work starts;
- errors: a `UsageError`, ``ValueError``, ``KeyError``, ``TypeError`` or ``OSError`` (file
  not found, read-only file system, disk full) is printed as one line,
  ``ctlens COMMAND: error: ...``, and the exit status is 2; Ctrl-C exits with 130. A library
  message that gives both spellings of an option, ``name=value (--flag ...)``, keeps the
  command line's (`CLI_SPELLING`).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from ctlens._version import __version__
from ctlens.cli.support import (
    HelpFormatter,
    apply_threads,
    check_device,
    check_output,
    describe_os_error,
)

COMMANDS: tuple[str, ...] = (
    "ctlens.cli.discover:add_discover_command",
    "ctlens.cli.tune:add_tune_command",
    "ctlens.cli.tasks:add_tasks_command",
    "ctlens.cli.report:add_report_command",
    "ctlens.cli.diff:add_diff_command",
    "ctlens.cli.zoo:add_zoo_command",
    "ctlens.cli.plan:add_plan_command",
    "ctlens.cli.make_delta:add_make_delta_command",
    "ctlens.cli.apply_delta:add_apply_delta_command",
)
"""The sub-commands, in help order: ``"module:function"`` registering each (see above)."""

CLI_SPELLING = re.compile(r"\b[a-z_]+=\S+ \((--[^)]+)\)")
"""``overwrite=True (--overwrite)`` in a library message: the command line keeps the flag."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a value starting with ``-`` and a digit (``--budget -5GB``,
    ``--lr -1e-3``) is taken as the option's value, whose own check then names what is
    wrong, instead of as an unknown option ("expected one argument"). No ctlens option
    looks like a negative number, so nothing else changes. Sub-parsers are built with
    the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also read by scripts/cli_reference.py for docs/cli.md)."""
    parser = _Parser(
        prog="ctlens",
        description="Find the circuit a transformer uses for a task, fine-tune inside it, "
        "and show how it changes.",
    )
    parser.add_argument("--version", action="version", version=f"ctlens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        module_name, _, function = entry.partition(":")
        getattr(importlib.import_module(module_name), function)(commands)
    _use_formatter(parser)
    return parser


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """`HelpFormatter` for ``parser``'s sub-commands, at every depth (``zoo train``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.formatter_class = HelpFormatter
                _use_formatter(child)


def _prepare(args: argparse.Namespace) -> None:
    """The checks and settings every command gets before it runs (module docstring)."""
    check = getattr(args, "check", None)
    if check is not None:
        check(args)
    out_kind = getattr(args, "out_kind", None)
    if out_kind is not None and getattr(args, "out", None) is not None:
        check_output(args.out, out_kind)
    apply_threads(getattr(args, "threads", None))
    check_device(getattr(args, "device", None))


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError):
        text = describe_os_error(err)
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    return CLI_SPELLING.sub(r"\1", " ".join(text.split()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctlens`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, (args.command, getattr(args, "zoo_command", None))))
    try:
        _prepare(args)
        return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError, OSError) as err:
        print(f"ctlens {name}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ctlens {name}: interrupted", file=sys.stderr)
        return 130
