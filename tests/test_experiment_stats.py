"""The experiment's statistics against hand-computed values (benchmarks/experiment_stats.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from experiment_stats import area_vs_reference, crossing, t_interval, t_quantile  # noqa: E402


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
