"""``ctlens zoo`` sub-commands: ``zoo list`` and ``zoo train NAME [--seed --steps --out]``.

``ctlens.cli`` calls :func:`add_zoo_command` with its sub-parser collection; each
registered parser sets ``func`` to a callable taking the parsed namespace and returning an
exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``zoo train`` (shared with ``python -m ctlens.zoo.train``)."""
    from ctlens.zoo.configs import SPECS

    parser.add_argument("name", help=f"zoo model to train ({', '.join(sorted(SPECS))})")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: recipe)")
    parser.add_argument(
        "--out", default=None, help="output directory (default: the shipped ctlens/zoo/models/NAME)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the recipe's, 2); the weights depend on it, so keep "
        "the recipe's to reproduce the shipped ones",
    )
    parser.set_defaults(func=run_train, out_kind="dir")


def run_train(args: argparse.Namespace) -> int:
    """Run ``zoo train`` and print the final metrics as JSON."""
    from ctlens.zoo.configs import UnknownModelError
    from ctlens.zoo.train import MODELS_DIR, train

    try:
        _, record = train(
            args.name, seed=args.seed, steps=args.steps, out=args.out, threads=args.threads
        )
    except (UnknownModelError, ValueError) as err:
        print(f"ctlens zoo train: {err}", file=sys.stderr)
        return 2
    out = args.out or str(MODELS_DIR / args.name)
    summary: dict[str, Any] = {
        "out": out,
        "train_seconds": record["train_seconds"],
        "final_loss": round(record["final_loss"], 4),
        **{k: round(v, 4) for k, v in record["eval"].items()},
    }
    print(json.dumps(summary, indent=1))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print the zoo models: name, shipped or not, description."""
    from ctlens.zoo import names
    from ctlens.zoo.configs import SPECS

    shipped = set(names())
    for name in sorted(SPECS):
        status = "shipped" if name in shipped else "not trained"
        print(f"{name:12s} {status:12s} {SPECS[name].description}")
    return 0


def add_zoo_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``zoo list`` and ``zoo train`` under an argparse sub-parser collection."""
    zoo = subparsers.add_parser("zoo", help="ctlens's own tiny pretrained models")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    lister = zoo_sub.add_parser("list", help="list the zoo models")
    lister.set_defaults(func=run_list)
    trainer = zoo_sub.add_parser("train", help="train a zoo model from scratch (CPU, seeded)")
    add_train_arguments(trainer)
    return zoo
