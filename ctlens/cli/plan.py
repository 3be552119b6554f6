"""``ctlens plan``: predict peak memory and a batch size that fits, before loading anything.

Light at import time (no torch): the command's module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_plan_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``ctlens plan`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "plan",
        help="predict peak memory of attribution, forward masking or a tuning step",
        description="Predict the peak memory of one ctlens operation from a model's shape "
        "(built on the meta device: no weights are loaded or downloaded) and, given a "
        "budget, the largest batch size that fits.",
    )
    p.add_argument("--model", required=True,
                   help="a real-shape name (gpt2, pythia-1b, llama-3.1-8b, ...; see "
                   "ctlens.real_shapes.names()), a local HF directory (config.json only is "
                   "read) or zoo:NAME")
    p.add_argument("--mode", dest="operation", default="attribute",
                   choices=["attribute", "forward", "tune"])
    p.add_argument("--method", default="eap", choices=["eap", "eap-ig"],
                   help="attribution method")
    p.add_argument("--batch-size", type=int, default=8, help="rows per pass")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--dtype", default=None, help="weights' dtype, e.g. bfloat16 "
                   "(default: the checkpoint's, float32 for a real-shape name); ctlens tune "
                   "trains fp32 weights, so plan --mode tune without it")
    p.add_argument("--mlp-groups", type=int, default=1, help="MLP neuron groups per layer")
    p.add_argument("--spans", type=int, default=1,
                   help="token spans of a positional graph (one score matrix each)")
    p.add_argument("--ranks", type=int, default=1, help="processes")
    p.add_argument("--shard", choices=["fsdp"], default=None,
                   help="shard weights, gradients and optimizer state across --ranks")
    p.add_argument("--budget", default=None,
                   help="memory per device, e.g. 80GB or 24GiB: recommends a batch size")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan, check=check_plan)
    return p


def check_plan(args: argparse.Namespace) -> None:
    """Refuse an unknown ``--model`` before torch is imported (names, zoo names and
    directories: what `_source` reads later)."""
    from pathlib import Path

    from ctlens import real_shapes

    text = args.model
    if text.startswith("zoo:"):
        from ctlens import zoo

        zoo.model_dir(text[4:])
    elif not Path(text).expanduser().is_dir():
        real_shapes.shape(text)


def _source(text: str) -> Any:
    """A real-shape name as is; a directory or zoo model as its HF config."""
    from pathlib import Path

    from ctlens import real_shapes

    if text.startswith("zoo:"):
        from ctlens import zoo

        return real_shapes_config(zoo.model_dir(text[4:]))
    path = Path(text).expanduser()
    if path.is_dir():
        return real_shapes_config(path)
    real_shapes.shape(text)  # unknown names fail here with the list of known ones
    return text


def real_shapes_config(path: Any) -> Any:
    """The HF config stored in the model directory ``path`` (no weights read)."""
    from pathlib import Path

    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; pass a model directory")
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as err:  # transformers' validation errors share no base but Exception
        why = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{Path(path) / 'config.json'} is not a readable model config "
                         f"({why}); the file is damaged or not an HF config") from None


def run_plan(args: argparse.Namespace) -> int:
    """Run ``ctlens plan`` (errors propagate as ValueError: one line, exit 2)."""
    from ctlens.planner import plan

    result = plan(
        _source(args.model), batch_size=args.batch_size, seq_len=args.seq_len,
        operation=args.operation, method=args.method, mlp_groups=args.mlp_groups,
        dtype=args.dtype, ranks=args.ranks, shard=args.shard, budget=args.budget,
        spans=args.spans,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0
