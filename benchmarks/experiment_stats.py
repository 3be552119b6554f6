"""Statistics of the circuit-tuning experiment (pure Python, no torch: unit-tested fast).

A run's trajectory is its evaluation records in step order: ``(step, target, general)``
with the target metric (higher is further towards the tuning goal) and the general LM
loss. Comparisons are made at *matched target*, never at matched step or learning rate:

- `crossing`: the first point where the target metric reaches a threshold, linearly
  interpolated between the two evaluations around it (step and general loss there).
- `area_vs_reference`: the mean gap between two runs' target -> general-loss curves
  (general loss at each target's first crossing), integrated over the target range both
  runs covered, divided by that range: in loss units, negative when the run keeps the
  general loss lower than the reference at the same target.
- `t_interval`: mean and the half-width of the two-sided 95 % Student-t interval over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, df = 1 .. 30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

Point = tuple[float, float, float]
"""One evaluation: (step, target metric, general LM loss)."""


def t_quantile(df: int) -> float:
    """t_{0.975, df} (the normal quantile 1.960 beyond df = 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def t_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % t-interval); half-width ``None`` for one value."""
    if not values:
        raise ValueError("t_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, t_quantile(n - 1) * math.sqrt(var / n)


def crossing(points: Sequence[Point], threshold: float) -> tuple[float, float] | None:
    """(step, general loss) where the target first reaches ``threshold``; ``None`` if never.

    Linear interpolation between the last evaluation below and the first at or above it;
    a run that starts at or above the threshold crosses at its first evaluation.
    """
    for i, (step, target, general) in enumerate(points):
        if target >= threshold:
            if i == 0:
                return step, general
            s0, t0, g0 = points[i - 1]
            frac = (threshold - t0) / (target - t0)
            return s0 + frac * (step - s0), g0 + frac * (general - g0)
    return None


def area_vs_reference(points: Sequence[Point], reference: Sequence[Point],
                      n_grid: int = 200) -> float | None:
    """Mean over targets of general(run) - general(reference), both at first crossing.

    The target range is from the larger of the two starting targets to the smaller of the
    two best targets; integrated with the trapezoid rule on ``n_grid`` + 1 equally spaced
    targets, then divided by the range. ``None`` when the range is empty.
    """
    lo = max(points[0][1], reference[0][1])
    hi = min(max(p[1] for p in points), max(p[1] for p in reference))
    if not hi > lo:
        return None
    grid = [lo + (hi - lo) * i / n_grid for i in range(n_grid + 1)]
    gaps = []
    for t in grid:
        a, b = crossing(points, t), crossing(reference, t)
        if a is None or b is None:  # only from float rounding at the top end
            return None
        gaps.append(a[1] - b[1])
    trapezoid = sum((gaps[i] + gaps[i + 1]) / 2 for i in range(n_grid)) / n_grid
    return trapezoid
