"""``ctlens diff A.json B.json -o diff.html``: two saved circuits drawn on one layout.

This module is imported for every ``ctlens --help``: plotly and torch load inside
`run_diff` only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ctlens.cli.support import phase


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


def add_diff_command(subparsers: Any) -> None:
    """Register ``diff`` under an argparse sub-parser collection."""
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
