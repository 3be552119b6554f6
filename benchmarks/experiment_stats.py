"""Statistics of the circuit-tuning experiment (pure Python, no torch: unit-tested fast).

A run's trajectory is its evaluation records in step order: ``(step, target, general)``
with the target metric (higher is further towards the tuning goal) and the general LM
loss. Comparisons are made at *matched target*, never at matched step or learning rate,
and on the *envelope over learning rates*: a mode's runs at every lr of its grid, for one
seed, count as one curve whose general loss at a target is the lowest any of them had
there.

- `crossing`: the first point where the target metric reaches a threshold, linearly
  interpolated between the two evaluations around it (step and general loss there).
- `envelope_at`: over several curves (one seed's runs at each lr), the lowest general loss
  at the first crossing of a threshold, and which curve gave it.
- `area_between`: the mean gap between two envelopes' target -> general-loss curves,
  integrated over the target range both covered, divided by that range: in loss units,
  negative when the first keeps the general loss lower at the same target.
  `area_vs_reference` is the same for one curve on each side.
- `t_interval`: mean and the half-width of the two-sided 95 % Student-t interval over seeds;
  `mean_envelope`: the mean envelope over seeds along a target grid (the figures' lines).
- `wilcoxon`: the exact two-sided Wilcoxon signed-rank test of paired differences (zeros
  dropped, tied magnitudes given their mean rank, infinite differences ranked above all
  finite ones); `holm`: Holm's step-down adjustment of a family of p-values.
- `paired`: one paired cell: per-seed values of two sides (``None``: that side never got
  there), the counts of each case, the t interval over seeds where both got there, and the
  Wilcoxon test in which a seed where only one side got there counts as the largest win
  for that side (the other side's value is taken as +infinity).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

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


def envelope_at(curves: Sequence[Sequence[Point]], threshold: float
                ) -> tuple[float, int] | None:
    """(lowest general loss at the first crossing of ``threshold``, index of the curve that
    had it) over ``curves``; ``None`` when none reaches it. Ties go to the first curve."""
    best: tuple[float, int] | None = None
    for i, points in enumerate(curves):
        hit = crossing(points, threshold)
        if hit is not None and (best is None or hit[1] < best[0]):
            best = (hit[1], i)
    return best


def area_between(curves: Sequence[Sequence[Point]], reference: Sequence[Sequence[Point]],
                 n_grid: int = 200) -> float | None:
    """Mean over targets of envelope(curves) - envelope(reference) (`envelope_at`).

    The target range runs from the larger of the two sides' lowest starting targets to the
    smaller of the two sides' best targets; integrated with the trapezoid rule on
    ``n_grid`` + 1 equally spaced targets, then divided by the range. ``None`` when the
    range is empty (a side never rose above the other's start).
    """
    lo = max(min(p[0][1] for p in curves), min(p[0][1] for p in reference))
    hi = min(max(x[1] for p in curves for x in p), max(x[1] for p in reference for x in p))
    if not hi > lo:
        return None
    gaps = []
    for i in range(n_grid + 1):
        t = lo + (hi - lo) * i / n_grid
        a, b = envelope_at(curves, t), envelope_at(reference, t)
        if a is None or b is None:  # only from float rounding at the top end
            return None
        gaps.append(a[0] - b[0])
    return sum((gaps[i] + gaps[i + 1]) / 2 for i in range(n_grid)) / n_grid


def area_vs_reference(points: Sequence[Point], reference: Sequence[Point],
                      n_grid: int = 200) -> float | None:
    """`area_between` for one curve on each side."""
    return area_between([points], [reference], n_grid)


def mean_envelope(curves_by_seed: Mapping[Any, Sequence[Sequence[Point]]], n_grid: int = 40
                  ) -> dict[str, list[Any]]:
    """The envelope's general loss along a grid of targets, mean and 95 % t half-width over
    seeds (``[mean, half]`` per target), from the highest starting target to the highest
    target every seed's envelope reached: ``{"target": [...], "general": [...]}``."""
    if not curves_by_seed:
        return {"target": [], "general": []}
    lo = max(min(p[0][1] for p in c) for c in curves_by_seed.values())
    hi = min(max(x[1] for p in c for x in p) for c in curves_by_seed.values())
    if not hi > lo:
        return {"target": [], "general": []}
    targets = [lo + (hi - lo) * i / n_grid for i in range(n_grid + 1)]
    general = []
    for t in targets:
        values = [envelope_at(c, t) for c in curves_by_seed.values()]
        general.append(list(t_interval([v[0] for v in values if v is not None])))
    return {"target": targets, "general": general}


def _null_distribution(doubled_ranks: Sequence[int]) -> list[float]:
    """P(W+ = w / 2) for w = 0 .. sum(doubled_ranks), every sign equally likely."""
    counts = [1.0] + [0.0] * sum(doubled_ranks)
    for r in doubled_ranks:
        counts = [c + (counts[w - r] if w >= r else 0.0) for w, c in enumerate(counts)]
    total = 2.0 ** len(doubled_ranks)
    return [c / total for c in counts]


def wilcoxon(diffs: Sequence[float]) -> tuple[float, float, float]:
    """(W+, W-, two-sided exact p) of the Wilcoxon signed-rank test of ``diffs``.

    Zero differences are dropped; tied |differences| get their mean rank (the exact null
    distribution is enumerated over those ranks, so ties need no approximation); +-infinity
    ranks above every finite difference. p = min(1, 2 min(P(W+ <= w), P(W+ >= w))); with no
    nonzero difference p is 1.
    """
    nonzero = sorted((d for d in diffs if d != 0), key=abs)
    if not nonzero:
        return 0.0, 0.0, 1.0
    doubled: list[int] = []  # 2 x rank: mean ranks of ties are then integers
    i = 0
    while i < len(nonzero):
        j = i
        while j + 1 < len(nonzero) and abs(nonzero[j + 1]) == abs(nonzero[i]):
            j += 1
        doubled += [i + j + 2] * (j - i + 1)  # ranks i+1 .. j+1, mean (i + j + 2) / 2
        i = j + 1
    w_plus2 = sum(r for r, d in zip(doubled, nonzero, strict=True) if d > 0)
    w_minus2 = sum(doubled) - w_plus2
    dist = _null_distribution(doubled)
    below = sum(dist[: w_plus2 + 1])
    above = sum(dist[w_plus2:])
    return w_plus2 / 2, w_minus2 / 2, min(1.0, 2 * min(below, above))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: the k-th smallest p (k from
    0) times (m - k), made non-decreasing along that order, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired(a: Mapping[Any, float | None], b: Mapping[Any, float | None]) -> dict[str, Any]:
    """One paired cell, a minus b, over the seeds both sides have (lower is better).

    ``a`` and ``b`` map seed -> value, ``None`` where that side never got there. Returns
    ``n`` (seeds compared), ``both``, ``only_a``, ``only_b``, ``neither`` (counts),
    ``a_lower`` / ``a_higher`` (seeds where a's value is lower / higher, a seed where only
    a got there counting as lower), ``t`` ([mean, half-width] of a - b over the seeds where
    both got there, ``None`` without any) and ``wilcoxon`` ([W+, W-, p]; a seed where only a
    got there enters as a - b = -infinity, only b as +infinity, neither is left out).
    """
    seeds = [s for s in a if s in b]
    diffs: list[float] = []
    finite: list[float] = []
    counts = {"both": 0, "only_a": 0, "only_b": 0, "neither": 0}
    for s in seeds:
        va, vb = a[s], b[s]
        if va is not None and vb is not None:
            counts["both"] += 1
            finite.append(va - vb)
            diffs.append(va - vb)
        elif va is not None:
            counts["only_a"] += 1
            diffs.append(-math.inf)
        elif vb is not None:
            counts["only_b"] += 1
            diffs.append(math.inf)
        else:
            counts["neither"] += 1
    return {
        "n": len(seeds), **counts,
        "a_lower": sum(d < 0 for d in diffs), "a_higher": sum(d > 0 for d in diffs),
        "t": list(t_interval(finite)) if finite else None,
        "wilcoxon": list(wilcoxon(diffs)),
    }
