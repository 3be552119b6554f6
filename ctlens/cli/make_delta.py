"""``ctlens make-delta BASE TUNED --out DIR``: the change between two models as a small delta.

Light at import time (no torch): the work is imported only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_make_delta_command(subparsers: Any) -> None:
    """Register ``make-delta`` on an argparse sub-parser collection."""
    make = subparsers.add_parser(
        "make-delta",
        help="write the change between two model directories as a small delta",
        description="Compare a base and a tuned HF model directory (or .safetensors files) "
        "and write the changed slices (delta.safetensors) with a manifest of which slices "
        "and the checksums of the delta and the base.",
    )
    make.add_argument("base", help="the model before tuning (HF directory or .safetensors)")
    make.add_argument("tuned", help="the tuned model (e.g. RUN/model), same layout")
    make.add_argument("--out", required=True,
                      help="the delta directory to write (new, empty, or a previous delta)")
    make.add_argument("--overwrite", action="store_true",
                      help="write into a non-empty --out beside files make-delta did not "
                      "write (they are kept)")
    make.set_defaults(func=run_make_delta, out_kind="dir")


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def run_make_delta(args: argparse.Namespace) -> int:
    """Run ``ctlens make-delta``."""
    from pathlib import Path

    from ctlens.delta import save_delta

    info = save_delta(args.base, args.tuned, args.out, overwrite=args.overwrite)
    base = Path(args.base)
    files = [base] if base.is_file() else list(base.glob("*.safetensors"))
    full = sum(f.stat().st_size for f in files)
    print(f"delta written to {info.path}: {info.changed_tensors} tensors changed, "
          f"{info.changed_values:,} of {info.total_values:,} values stored; "
          f"{_size(info.bytes)} vs {_size(full)} for the full weights")
    return 0
