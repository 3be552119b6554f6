"""Retrain a shipped zoo model and record the check in its ``training.json``.

The model card (``python scripts/zoo_card.py``) shows what this records:

    python scripts/zoo_check.py tiny-llama            # the shipped seed: bit-identical weights?
    python scripts/zoo_check.py tiny-llama --seed 1   # another seed: does the recipe still pass?

Each run retrains with the shipped recipe (steps, threads) in a temporary folder, so the
shipped weights are never touched; only ``training.json`` gets the ``reproduction`` entry or
one ``seed_checks`` entry per seed, written atomically.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ctlens.zoo import model_dir, training_record
from ctlens.zoo.evaluate import induction_heads
from ctlens.zoo.train import train, write_record

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_card import induction_path_ranks  # noqa: E402


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/zoo_check.py", description=__doc__)
    parser.add_argument("name", help="a shipped zoo model")
    parser.add_argument("--seed", type=int, default=None, help="default: the shipped seed")
    args = parser.parse_args(argv)
    record = training_record(args.name)
    recipe = record["recipe"]
    seed = recipe["seed"] if args.seed is None else args.seed
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / args.name
        _, new = train(args.name, seed=seed, steps=recipe["steps"], threads=recipe["threads"],
                       out=out)
        timing = {"train_seconds": new["train_seconds"], "cpu_seconds": new["cpu_seconds"]}
        if seed == recipe["seed"]:
            record["reproduction"] = {
                "command": f"ctlens zoo train {args.name} --out DIR",
                "date": datetime.date.today().isoformat(),
                "identical_weights": _same_weights(out, model_dir(args.name)),
                "identical_eval": new["eval"] == record["eval"],
                **timing,
            }
        else:
            model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
            paths = induction_path_ranks(out, induction_heads(model))["paths"]
            checks = [c for c in record.get("seed_checks", []) if c["seed"] != seed]
            checks.append({
                "seed": seed,
                "final_loss": new["final_loss"],
                **timing,
                "eval": {k: v for k, v in new["eval"].items() if k not in ("n", "seed")},
                "induction_paths_top5": paths,
            })
            record["seed_checks"] = sorted(checks, key=lambda c: c["seed"])
    write_record(model_dir(args.name), record)
    print(json.dumps({k: record[k] for k in ("reproduction", "seed_checks") if k in record},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
