"""``ctlens apply-delta BASE DELTA --out DIR``: a delta applied to its base model.

Light at import time (no torch): the work is imported only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_apply_delta_command(subparsers: Any) -> None:
    """Register ``apply-delta`` on an argparse sub-parser collection."""
    apply = subparsers.add_parser(
        "apply-delta",
        help="apply a delta to its base model directory, writing the tuned model",
        description="Apply a delta written by make-delta (or ctlens.delta.save_delta) to the "
        "base model directory it was made from; refuses any other base.",
    )
    apply.add_argument("base", help="the base HF model directory")
    apply.add_argument("delta", help="the delta directory")
    apply.add_argument("--out", required=True, help="the tuned model directory to write "
                       "(new, empty, or a previous apply-delta output)")
    apply.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty --out beside files apply-delta did not "
                       "write (they are kept)")
    apply.set_defaults(func=run_apply_delta, out_kind="dir")


def run_apply_delta(args: argparse.Namespace) -> int:
    """Run ``ctlens apply-delta``."""
    from ctlens.delta import write_weights

    out = write_weights(args.base, args.delta, args.out, overwrite=args.overwrite)
    print(f"tuned model written to {out}")
    return 0
