"""Circuit sizes (`ctlens.sizes`): one form check, one rounding rule, one error for a size
larger than the graph."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import ctlens
from ctlens.graph import Graph
from ctlens.scores import EdgeScores
from ctlens.sizes import CircuitSize, fraction_edges, parse_size
from ctlens.tuning import TuneConfig


def test_fraction_edges_rounds_to_nearest_within_the_graph() -> None:
    assert [fraction_edges(f, 110) for f in (0.001, 0.01, 0.05, 0.1, 0.5, 1.0)] == \
        [1, 1, 6, 11, 55, 110]  # 5.5 -> 6 (tie to even), 0.11 and 1.1 -> at least 1
    assert fraction_edges(0.45, 10) == 4 and fraction_edges(0.55, 10) == 6
    assert fraction_edges(0.25, 10) == 2  # 2.5: the tie goes to the even count
    assert fraction_edges(0.99, 3) == 3 and fraction_edges(0.999, 1) == 1


@pytest.mark.parametrize(("bad", "why"), [(0, "positive integer"), (-3, "positive integer"),
                                          (1.0, "strictly between 0 and 1"),
                                          (float("nan"), "strictly between"),
                                          (True, "number of edges"), (None, "number of edges"),
                                          ("5", "number of edges")])
def test_the_form_is_checked_once_when_made(bad: object, why: str) -> None:
    with pytest.raises(ValueError, match=f"^top_n.*{why}"):
        CircuitSize(bad)  # type: ignore[arg-type]


def test_a_size_meets_the_graph_in_one_place() -> None:
    assert CircuitSize(0.05).edges(110) == 6 and CircuitSize(110).edges(110) == 110
    with pytest.raises(ValueError, match=r"^top_n_start=111 is out of range: it is larger than "
                                         r"the model's graph, whose number of valid edges "
                                         r"\(110\).*choose at most 110"):
        CircuitSize(111, "top_n_start").edges(110)


def test_a_checked_size_travels_without_a_second_check() -> None:
    size = parse_size("0.05")
    assert size == CircuitSize(0.05, "value")
    assert CircuitSize.of(size, "value") is size
    renamed = CircuitSize.of(size, "top_n")
    assert (renamed.value, renamed.name) == (0.05, "top_n")
    config = TuneConfig(top_n=size, top_n_start=parse_size("300"))
    assert (config.top_n, config.top_n_start) == (0.05, 300)
    assert json.loads(json.dumps(config.to_dict()))["top_n"] == 0.05
    assert config.top_n_ends(32491) == (300, 1625) and config == TuneConfig(top_n=0.05,
                                                                           top_n_start=300)
    with pytest.raises(argparse.ArgumentTypeError, match="value must be a positive integer"):
        parse_size("0")
    with pytest.raises(ValueError, match="top_n_start=40000 is out of range"):
        TuneConfig(top_n_start=40000).top_n_ends(32491)


def test_selection_and_the_faithfulness_curve_share_the_rule(tiny_model, task) -> None:
    """A curve's grid point keeps as many edges as `Circuit.from_scores(top_n=fraction)`."""
    graph = Graph.from_model(tiny_model)
    noise = torch.randn(graph.n_senders, graph.n_receivers,
                        generator=torch.Generator().manual_seed(0))
    scores = EdgeScores(noise, graph)
    fractions = (0.05, 0.15, 0.5)
    curve = ctlens.faithfulness_curve(tiny_model, task, scores, sizes=fractions,
                                      batch_size=None)
    assert curve.n_edges == tuple(ctlens.Circuit.from_scores(scores, top_n=f).n_edges
                                  for f in fractions)
    assert curve.n_edges == tuple(max(1, round(f * graph.n_edges)) for f in fractions)
