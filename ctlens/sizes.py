"""Circuit sizes: a number of edges, or a fraction of a graph's valid edges.

A grouped graph has many more edges than the one-group graph (GPT-2 small with 48 groups
per MLP: 341,281 instead of 32,491), so a fixed edge count means very different circuits on
the two. Every place that takes a circuit size (``top_n``, ``--top-n``, the tuner's
schedule) therefore also takes a fraction: an ``int`` is a number of edges, a ``float``
strictly between 0 and 1 a fraction of the valid edges (rounded, at least one edge).
"""

from __future__ import annotations

import argparse
import math

Size = int | float


def check_size(size: object, name: str = "top_n") -> Size:
    """``size`` if it is a positive edge count or a fraction in (0, 1); else a clear error."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(
            f"{name} must be a number of edges (int >= 1) or a fraction of the valid edges "
            f"(float between 0 and 1), got {size!r}"
        )
    if isinstance(size, int):
        if size < 1:
            raise ValueError(
                f"{name} must be a positive integer (a number of edges) or a fraction of the "
                f"valid edges strictly between 0 and 1, got {size!r}"
            )
        return size
    if not (math.isfinite(size) and 0 < size < 1):
        raise ValueError(
            f"{name}={size!r}: a fraction of the valid edges must lie strictly between 0 and "
            "1 (write a number of edges as an integer, e.g. 300)"
        )
    return size


def edge_count(size: Size, n_edges: int, name: str = "top_n") -> int:
    """``size`` as a number of edges of a graph with ``n_edges`` valid edges."""
    size = check_size(size, name)
    if isinstance(size, float):
        return max(1, min(n_edges, round(size * n_edges)))
    if size > n_edges:
        raise ValueError(
            f"{name}={size} is out of range: choose between 1 and the number of valid edges "
            f"({n_edges}), or a fraction such as 0.05"
        )
    return size


def parse_size(text: str) -> Size:
    """argparse ``type=`` for a circuit size: ``300`` (edges) or ``0.05`` (a fraction)."""
    try:
        value: Size = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of edges (e.g. 300) or a fraction (e.g. 0.05)"
            ) from None
    try:
        return check_size(value, "value")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
