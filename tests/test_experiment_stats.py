"""The experiment's statistics against hand-computed values (benchmarks/experiment_stats.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from experiment_stats import (  # noqa: E402
    area_between,
    area_vs_reference,
    crossing,
    envelope_at,
    holm,
    paired,
    t_interval,
    t_quantile,
    wilcoxon,
)


def test_t_interval_by_hand() -> None:
    # values 1, 2, 3: mean 2, sample sd 1, half-width 4.303 * 1 / sqrt(3) = 2.48434...
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.303 / 3 ** 0.5)
    # two values 0 and 2: sd sqrt(2), half-width 12.706 * sqrt(2) / sqrt(2) = 12.706
    assert t_interval([0.0, 2.0])[1] == pytest.approx(12.706)
    assert t_interval([5.0]) == (5.0, None)
    assert t_quantile(40) == 1.960
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])


def test_crossing_interpolates_between_evaluations() -> None:
    points = [(0, -4.0, 1.0), (10, -1.0, 1.3), (20, 2.0, 1.9), (30, 1.0, 2.5)]
    # threshold 0: between steps 10 and 20, a third of the way: step 13.33, loss 1.3 + 0.2
    step, general = crossing(points, 0.0)
    assert step == pytest.approx(10 + 10 / 3)
    assert general == pytest.approx(1.5)
    # exactly on an evaluation; and the first crossing counts even if the target falls later
    assert crossing(points, 2.0) == pytest.approx((20, 1.9))
    assert crossing(points, -5.0) == (0, 1.0)
    assert crossing(points, 2.5) is None


def test_area_between_curves_by_hand() -> None:
    # reference: general = 1 + 0.1 * (t + 4) on t in [-4, 2]; run: 0.05 lower everywhere
    # at t = -4 rising to 0.2 lower at t = 2 -> mean gap -(0.05 + 0.2) / 2 = -0.125
    reference = [(0, -4.0, 1.0), (10, 2.0, 1.6)]
    run = [(0, -4.0, 0.95), (10, 2.0, 1.4)]
    assert area_vs_reference(run, reference) == pytest.approx(-0.125)
    # the range is clipped to what both covered: run reaches only t = -1 (gap grows
    # linearly from -0.05 to -0.125 there) -> mean -0.0875
    short = [(0, -4.0, 0.95), (10, -1.0, 1.175)]
    assert area_vs_reference(short, reference) == pytest.approx(-0.0875)
    assert area_vs_reference([(0, -4.0, 1.0), (10, -5.0, 1.0)], reference) is None


def test_envelope_takes_the_lowest_general_loss_over_the_curves() -> None:
    # curve 0 stays at general 1.0 up to t = -2.5, then rises to 1.3 at t = -1 (its best);
    # curve 1 climbs linearly from (t -4, 1.0) to (t 2, 1.6)
    low = [(0, -4.0, 1.0), (5, -2.5, 1.0), (10, -1.0, 1.3)]
    steep = [(0, -4.0, 1.0), (10, 2.0, 1.6)]
    assert envelope_at([low, steep], -2.0) == pytest.approx((1.1, 0))  # 1.1 < 1.2
    assert envelope_at([low, steep], 0.0) == pytest.approx((1.4, 1))  # only curve 1
    assert envelope_at([low, steep], 3.0) is None
    # against the reference (= steep): the gap falls from 0 to -0.15 on [-4, -2.5], rises
    # back to 0 at t = -1 and stays 0: a triangle of area 0.225 over a range of 6
    assert area_between([low, steep], [steep]) == pytest.approx(-0.0375)
    assert area_between([steep], [steep]) == pytest.approx(0.0)
    assert area_vs_reference(low, steep) == pytest.approx(area_between([low], [steep]))


def test_wilcoxon_exact_by_hand() -> None:
    # all five negative: W+ = 0, W- = 15; P(W+ <= 0) = 1 / 32, two-sided 2 / 32
    assert wilcoxon([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx((0.0, 15.0, 0.0625))
    # ranks 1..6, only rank 2 negative: W- = 2; subsets of 1..6 summing to <= 2: {}, {1},
    # {2} -> P = 3 / 64, two-sided 6 / 64
    assert wilcoxon([1.0, -2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx((19.0, 2.0, 6 / 64))
    # ties: |d| = 1, 1, 2, 2 -> ranks 1.5, 1.5, 3.5, 3.5; W+ = 8.5, W- = 1.5; sign patterns
    # with W- <= 1.5: none negative, or one of the two rank-1.5 ones -> 3 / 16, p = 6 / 16
    assert wilcoxon([1.0, -1.0, 2.0, 2.0]) == pytest.approx((8.5, 1.5, 0.375))
    # an infinite difference ranks above the finite ones: ranks 0.2 -> 1, 0.5 -> 2, inf -> 3
    assert wilcoxon([-math.inf, -0.5, 0.2]) == pytest.approx((1.0, 5.0, 0.5))
    # zeros are dropped; nothing left -> p = 1
    assert wilcoxon([0.0, 0.0, -1.0]) == pytest.approx((0.0, 1.0, 1.0))
    assert wilcoxon([0.0]) == (0.0, 0.0, 1.0)


def _brute_force_wilcoxon_p(diffs: list[float]) -> float:
    """Two-sided exact p by listing all 2^n sign patterns of the mean ranks."""
    d = [x for x in diffs if x != 0]
    ranks = [sum(abs(y) < abs(x) for y in d) + (sum(abs(y) == abs(x) for y in d) + 1) / 2
             for x in d]
    observed = sum(r for r, x in zip(ranks, d, strict=True) if x > 0)
    sums = [sum(r for k, r in enumerate(ranks) if mask >> k & 1) for mask in range(2 ** len(d))]
    below = sum(w <= observed + 1e-9 for w in sums) / len(sums)
    above = sum(w >= observed - 1e-9 for w in sums) / len(sums)
    return min(1.0, 2 * min(below, above))


@pytest.mark.parametrize("diffs", [
    [0.31, -0.12, 0.54, 0.07, -0.02, 0.44, 0.29, -0.61, 0.18, 0.95],
    [0.2, -0.2, 0.2, 0.5, -math.inf, math.inf, 0.0, 1.5, -0.5, 0.5, 0.7, -0.1],
])
def test_wilcoxon_matches_an_enumeration_of_every_sign_pattern(diffs: list[float]) -> None:
    assert wilcoxon(diffs)[2] == pytest.approx(_brute_force_wilcoxon_p(diffs))


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04, 0.2 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08, 0.2; monotone:
    # 0.04, 0.09, 0.09, 0.2 (returned in the input order)
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_paired_cell_counts_every_seed() -> None:
    a = {1: 1.0, 2: 2.0, 3: None, 4: 1.5, 5: None}
    b = {1: 1.5, 2: 1.0, 3: 2.0, 4: None, 5: None, 6: 1.0}  # seed 6: a has no run
    cell = paired(a, b)
    assert (cell["n"], cell["both"], cell["only_a"], cell["only_b"], cell["neither"]) == \
        (5, 2, 1, 1, 1)
    assert (cell["a_lower"], cell["a_higher"]) == (2, 2)  # seeds 1, 4 / seeds 2, 3
    # t over the two finite differences -0.5, +1.0: mean 0.25, sd 0.75 sqrt(2),
    # half-width 12.706 * 0.75 sqrt(2) / sqrt(2)
    assert cell["t"] == pytest.approx([0.25, 12.706 * 0.75])
    # Wilcoxon on -0.5, +1.0, +inf, -inf: ranks 1, 2, 3.5, 3.5 -> W+ 5.5, W- 4.5; exact
    # p = 2 * P(W+ >= 5.5) = 2 * 8 / 16 = 1
    assert cell["wilcoxon"] == pytest.approx([5.5, 4.5, 1.0])
    assert paired({1: None}, {1: None})["t"] is None
