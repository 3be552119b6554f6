"""The result pages written by benchmarks/discovery.py and benchmarks/positional.py: their
counts and verdicts come from the stored numbers (hand-made records with known answers),
and storing one model's results keeps the others'."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import discovery as D  # noqa: E402
import positional as P  # noqa: E402

FRACTIONS = [0.25, 0.5, 1.0]


def _discovery_record(learned: list[list[float]], eap: list[float]) -> dict[str, Any]:
    """A (model, task) record with one EAP curve and one learned curve per seed."""
    runs = [{"seed": s, "seconds": [1.0, 1.0, 0.0], "in_sample": curve, "held_out": curve}
            for s, curve in enumerate(learned)]
    return {
        "model": "tiny-gpt2", "task": "ioi", "n_edges": 4, "n_examples": 8, "steps": 10,
        "fractions": FRACTIONS, "counts": [1, 2, 4],
        "methods": {
            "eap": {"seconds": 0.5, "runs": [{"held_out": eap, "in_sample": eap}]},
            "learned": {"seconds": 2.0, "runs": runs},
        },
    }


def test_closer_compares_distances_to_one_as_shown() -> None:
    assert D._closer(0.95, 0.90) == "closer"
    assert D._closer(1.04, 0.97) == "farther"  # an overshoot is as far as a shortfall
    assert D._closer(0.9004, 0.9001) == "tie"  # equal at 3 decimals
    assert D._closer(1.1, 0.9) == "tie"


def test_discovery_verdict_counts_sizes_below_full_with_the_seed_mean() -> None:
    # seed mean of learned: 0.6 at 1 edge (EAP 0.5: closer), 1.05 at 2 edges (EAP 0.98:
    # farther, an overshoot); the 100 % size is not counted
    record = _discovery_record([[0.5, 1.1, 1.0], [0.7, 1.0, 1.0]], [0.5, 0.98, 1.0])
    text = "\n".join(D._verdicts([record]))
    assert "Over all 2 (model, task, size) points below 100 %" in text
    assert "closer to 1 than the EAP circuit's of the same size at 1, farther at 1" in text
    assert "At 1 of the 1 points where it is farther, the learned circuit overshoots" in text
    assert "goal (learned closer to 1 at equal size) is not met" in text


def test_discovery_page_shows_seed_spread_and_missing_models() -> None:
    record = _discovery_record([[0.5, 0.9, 1.0], [0.7, 0.9, 1.0]], [0.4, 0.8, 1.0])
    page = D.page({"results": [record], "environment": "test"})
    assert "| 2 (50.0%) | 0.800 | 0.900 ± 0.000 |" in page
    assert "| 1 (25.0%) | 0.400 | 0.600 ± 0.141 |" in page
    assert "Not measured yet: mini-gpt2, tiny-llama" in page
    assert "is met on the zoo" in page


def _positional_record(model: str, free: float, equal_fraction: float,
                       equal_count: float) -> dict[str, Any]:
    """Flat curves (the same faithfulness at every size) with their MIB areas."""
    curves = {}
    for name, value in zip(P.CURVES, (free, equal_fraction, equal_count), strict=True):
        faith = [value] * len(FRACTIONS)
        cpr, cmd = P.curve_areas(FRACTIONS, faith)
        curves[name] = {"counts": [1, 2, 4], "faithfulness": faith, "cpr": cpr, "cmd": cmd}
    return {"model": model, "task": "agreement", "n_examples": 8, "spans": ["a", "other"],
            "n_edges": 4, "n_pairs": 8, "fractions": FRACTIONS,
            "seconds": {"eap": 0.1, "positional eap": 0.2}, "curves": curves}


def test_positional_areas_and_summary_by_hand() -> None:
    record = _positional_record("tiny-gpt2", 0.8, 0.9, -0.0000001)
    # a flat curve at f over fractions 0.25 ... 1: CPR = 0.75 f, CMD = 0.75 |1 - f|
    assert record["curves"][P.CURVES[0]]["cpr"] == pytest.approx(0.6)
    assert record["curves"][P.CURVES[1]]["cmd"] == pytest.approx(0.075)
    other = _positional_record("tiny-llama", 0.8, 0.7, 0.85)
    text = "\n".join(P._summary([record, other]))
    assert ("**positional, equal fraction** against position-free: higher CPR in 1 of 2 "
            "(model, task) pairs, lower CMD in 1 of 2.") in text
    assert ("**positional, equal count** against position-free: higher CPR in 1 of 2 "
            "(model, task) pairs, lower CMD in 1 of 2.") in text
    page = P.page({"results": [record], "environment": "test"})
    assert "| 25.0% | 0.800 (1) | 0.900 (1) | 0.000 (1) |" in page  # no "-0.000"
    assert "Not measured yet: mini-gpt2, tiny-llama" in page


def test_positional_store_keeps_other_models(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "RESULTS", tmp_path / "positional.json")
    P.store([_positional_record("tiny-gpt2", 0.8, 0.9, 0.7)])
    P.store([_positional_record("tiny-llama", 0.5, 0.6, 0.4)])
    P.store([_positional_record("tiny-gpt2", 0.1, 0.2, 0.3)])  # replaces, not duplicates
    stored = json.loads((tmp_path / "positional.json").read_text())
    assert [(r["model"], r["curves"][P.CURVES[0]]["faithfulness"][0])
            for r in stored["results"]] == [("tiny-gpt2", 0.1), ("tiny-llama", 0.5)]


def test_positional_oracle_rows_are_stored_apart_and_judged_within_005(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "RESULTS", tmp_path / "positional.json")
    P.store([_positional_record("tiny-gpt2", 0.8, 0.9, 0.7)])
    oracle = [{"model": m, "n_examples": 24,
               "position-free": {"r": free, "exact_seconds": 10.0},
               "per span": {"r": span, "exact_seconds": 40.0}}
              for m, free, span in (("tiny-gpt2", 0.93, 0.945), ("mini-gpt2", 0.9, 0.84))]
    stored = P.store(oracle, part="oracle")
    assert [r["model"] for r in stored["results"]] == ["tiny-gpt2"]  # the curves kept
    page = P.page(stored)
    assert "| tiny-gpt2 | 24 | 0.930 | 0.945 | 0.015 | yes | 10 / 40 |" in page
    assert "| mini-gpt2 | 24 | 0.900 | 0.840 | -0.060 | no | 10 / 40 |" in page
