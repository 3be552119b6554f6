"""``ctlens report RUN_DIR [-o OUT]`` and ``ctlens diff A.json B.json -o diff.html``.

``ctlens/cli.py`` calls `add_viz_commands` with its sub-parser collection; each parser sets
``func`` to a callable that takes the parsed namespace and returns an exit code. Errors are
raised as ``ValueError`` / ``FileNotFoundError`` with a message saying what to fix, which the
main command prints. This module is imported for every ``ctlens --help``: plotly and torch
load inside the runners only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ctlens.cli_support import check_output, phase, positive_int


def run_report(args: argparse.Namespace) -> int:
    """Write the run's HTML report and print its path and size."""
    if args.out is None:  # the default lands in the run directory: check it can be written
        check_output(Path(args.run_dir) / "report.html", "file", flag="RUN_DIR")
    with phase("loading plotly and the run reader"):
        from ctlens.viz.report import write_report
        from ctlens.viz.run import read_run
    with phase(f"reading {args.run_dir}"):
        run = read_run(args.run_dir)
    with phase(f"drawing {len(run.steps)} circuit snapshots and writing the report"):
        path = write_report(run, out=args.out, top=args.top, max_frames=args.max_frames)
    print(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    print(path)
    return 0


def run_diff(args: argparse.Namespace) -> int:
    """Write the diff of two circuit files as HTML and print the counts."""
    with phase("loading plotly and the circuits"):
        from ctlens.viz.figures import diff_counts
        from ctlens.viz.report import write_diff
        from ctlens.viz.run import load_circuit

        a, b = load_circuit(args.a), load_circuit(args.b)
    with phase("drawing and writing the diff"):
        counts = diff_counts(a, b)
        path = write_diff(a, b, args.out)
    print(
        f"only in A: {counts['edges_only_a']} edges, only in B: {counts['edges_only_b']}, "
        f"both: {counts['edges_both']}; edge Jaccard {counts['edge_jaccard']:.3f}, "
        f"node Jaccard {counts['node_jaccard']:.3f}"
    )
    print(f"diff written to {path}", file=sys.stderr)
    return 0


def add_viz_commands(subparsers: Any) -> None:
    """Register ``report`` and ``diff`` under an argparse sub-parser collection."""
    report = subparsers.add_parser(
        "report",
        help="write RUN_DIR/report.html: the run's circuits, diffs, metrics and config",
        description="Write one self-contained, offline HTML report of a tuning run "
        "(docs/run-format.md): circuit evolution, last circuit, first-vs-last diff, node "
        "scores, config and metrics.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by the tuner")
    report.add_argument("-o", "--out", default=None,
                        help="output file (default RUN_DIR/report.html)")
    report.add_argument("--top", type=positive_int, default=300,
                        help="edges drawn per circuit, strongest first (default 300)")
    report.add_argument("--max-frames", type=positive_int, default=40,
                        help="circuit snapshots in the evolution slider (default 40)")
    report.set_defaults(func=run_report, out_kind="file")

    diff = subparsers.add_parser(
        "diff",
        help="compare two saved circuits: edges only in A, only in B, in both (HTML)",
        description="Draw two circuits (files written by Circuit.save) on one layout and "
        "write the figure as one self-contained HTML file.",
    )
    diff.add_argument("a", metavar="A.json", help="first circuit file")
    diff.add_argument("b", metavar="B.json", help="second circuit file")
    diff.add_argument("-o", "--out", required=True, help="output HTML file")
    diff.set_defaults(func=run_diff, out_kind="file")
