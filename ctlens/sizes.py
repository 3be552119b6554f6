"""Circuit sizes: a number of edges, or a fraction of a graph's valid edges (`CircuitSize`).

A grouped graph has many more edges than the one-group graph (GPT-2 small with 48 groups
per MLP: 341,281 instead of 32,491), so a fixed edge count means very different circuits on
the two. Every place that takes a circuit size (``top_n``, ``--top-n``, the tuner's
schedule) therefore also takes a fraction: an ``int`` is a number of edges, a ``float``
strictly between 0 and 1 a fraction of the valid edges.

A size is asked about once: its form when a `CircuitSize` is made (at the edge: a
``--top-n`` flag, `ctlens.TuneConfig`, `ctlens.Circuit.from_scores`), its fit when it is
resolved against a graph (`CircuitSize.edges`). One rounding rule turns a fraction into a
count everywhere, `fraction_edges` (round to nearest, at least one edge, at most all):
selection, the tuner's schedule and `ctlens.faithfulness_curve`'s grid.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

Size = int | float


def fraction_edges(fraction: float, n_edges: int) -> int:
    """The number of edges a ``fraction`` of ``n_edges`` valid edges means: rounded to the
    nearest count (a tie to the even one, as Python's ``round``), at least one edge and at
    most all of them."""
    return max(1, min(n_edges, round(fraction * n_edges)))


@dataclass(frozen=True)
class CircuitSize:
    """A circuit size whose form is checked once, when it is made: ``value`` is a number of
    edges (``int >= 1``) or a fraction of the valid edges (``float`` in (0, 1)); ``name``
    (the option it came from) names it in errors."""

    value: Size
    name: str = "top_n"

    def __post_init__(self) -> None:
        size, name = self.value, self.name
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ValueError(
                f"{name} must be a number of edges (int >= 1) or a fraction of the valid "
                f"edges (float between 0 and 1), got {size!r}"
            )
        if isinstance(size, int):
            if size < 1:
                raise ValueError(
                    f"{name} must be a positive integer (a number of edges) or a fraction of "
                    f"the valid edges strictly between 0 and 1, got {size!r}"
                )
        elif not (math.isfinite(size) and 0 < size < 1):
            raise ValueError(
                f"{name}={size!r}: a fraction of the valid edges must lie strictly between 0 "
                "and 1 (write a number of edges as an integer, e.g. 300)"
            )

    @classmethod
    def of(cls, size: Size | CircuitSize | None, name: str = "top_n") -> CircuitSize:
        """``size`` as a `CircuitSize` named ``name`` (one made already is not checked
        again; anything that is not a size, None included, is refused)."""
        if isinstance(size, CircuitSize):
            return size if size.name == name else cls._unchecked(size.value, name)
        return cls(size, name)  # type: ignore[arg-type]  (__post_init__ refuses non-sizes)

    @classmethod
    def _unchecked(cls, value: Size, name: str) -> CircuitSize:
        made = object.__new__(cls)
        object.__setattr__(made, "value", value)
        object.__setattr__(made, "name", name)
        return made

    def edges(self, n_edges: int) -> int:
        """This size on a graph with ``n_edges`` valid edges: a fraction by `fraction_edges`;
        a count must fit the graph (else the one error that says so)."""
        if isinstance(self.value, float):
            return fraction_edges(self.value, n_edges)
        if self.value > n_edges:
            raise ValueError(
                f"{self.name}={self.value} is out of range: it is larger than the model's "
                f"graph, whose number of valid edges ({n_edges}) is the most a circuit can "
                f"hold; choose at most {n_edges}, or a fraction such as 0.05"
            )
        return self.value


def parse_size(text: str) -> CircuitSize:
    """argparse ``type=`` for a circuit size: ``300`` (edges) or ``0.05`` (a fraction); the
    flag's `CircuitSize`, checked here (argparse reports a bad one with the usage)."""
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
        return CircuitSize(value, "value")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
