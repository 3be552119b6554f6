"""``ctlens report RUN_DIR [-o OUT]``: a tuning run's self-contained HTML report.

This module is imported for every ``ctlens --help``: plotly and torch load inside
`run_report` only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ctlens.cli.support import check_output, phase, positive_int


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


def add_report_command(subparsers: Any) -> None:
    """Register ``report`` under an argparse sub-parser collection."""
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
