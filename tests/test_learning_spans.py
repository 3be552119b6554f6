"""Learned circuits on positional graphs: one gate per (edge, token span).

Oracles: the positional `edge_mask` (0/1 gates spell a positional circuit), the plain model
(gates at 1), a slow rebuild with one plain-autograd term per edge and position (values
and every gate's gradient), `torch.autograd.gradcheck` (finite differences), the
position-free `learn_circuit` (one span covering every token), and `faithfulness`
recomputed from the saved circuit file.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import random_task, tiny_gpt2_module, tiny_llama_module
from test_learning import (
    PLANTED,
    assert_state,
    mixed_state,
    model_state,
    planted_model,
    reference_for,
    slow_gated_forward,
)
from test_positional import spanned

import ctlens
from ctlens import Circuit, Graph
from ctlens.learning import GatedForward, learn_circuit
from ctlens.learning.learn import frozen_parameters
from ctlens.learning.span_gates import SpanGatedForward, gated_forward
from ctlens.types import Ablation

ABLATIONS = ["corrupt", "mean", "zero"]


def build(family: str = "gpt2"):
    module = {"gpt2": tiny_gpt2_module, "llama": tiny_llama_module}[family](dtype=torch.float64)
    return ctlens.load_model(module)


def run_span_gated(model, graph: Graph, gates, ablation: str, data, means=None):
    """Logits of ``model`` on ``data.clean`` with every (edge, span) scaled by ``gates``."""
    kind = Ablation.parse(ablation)
    gated = gated_forward(model, graph, kind, means if kind is Ablation.MEAN else None)
    assert isinstance(gated, SpanGatedForward)
    with model.hooks(fwd_hooks=gated.hooks()):
        if kind is Ablation.CORRUPT:
            gated.use_reference(gated.record_reference(data.corrupt))
        gated.set_spans(data.spans)
        gated.set_gates(gates)
        return model(data.clean)


def real(logits: torch.Tensor, data) -> torch.Tensor:
    """The logits at real tokens: padding (right of every real token, which cannot read it)
    belongs to no span, so no (edge, span) pair touches it."""
    return logits[data.attention_mask]


# ------------------------------------------------------------------ the gated forward


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_span_gates_at_one_are_the_full_model_bit_for_bit(family, ablation) -> None:
    model = build(family)
    data = spanned(random_task(n=5, seq=7, seed=3))
    graph = Graph.from_model(model, spans=data)
    means = reference_for("mean", model, data, graph)
    ones = torch.ones(graph.dense_shape)
    with torch.no_grad():
        plain = model(data.clean)
        assert torch.equal(run_span_gated(model, graph, ones, ablation, data, means), plain)
    live = run_span_gated(model, graph, ones.requires_grad_(True), ablation, data, means)
    assert torch.equal(live, plain)  # through the custom function: the same values


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize("mlp_groups", [1, 2])
def test_binary_span_gates_are_the_positional_edge_mask(family, ablation, mlp_groups) -> None:
    """Gates at 0 give `edge_mask`'s empty positional circuit; gates that are 1 exactly on a
    circuit's (edge, span) pairs give `edge_mask` with that circuit, with or without neuron
    groups (float64; the two add the same terms in another order)."""
    model = build(family)
    data = spanned(random_task(n=5, seq=7, seed=3))
    graph = Graph.from_model(model, mlp_groups=mlp_groups, spans=data)
    reference = reference_for(ablation, model, data, graph)
    gen = torch.Generator().manual_seed(3)
    some = (torch.rand(graph.dense_shape, generator=gen) < 0.5) & graph.dense_valid
    tol = 2e-6 if family == "llama" else 1e-12  # Llama's RMSNorm rounds through float32
    for circuit in (Circuit.empty(graph), Circuit(graph, some), Circuit.full(graph)):
        with torch.no_grad():
            with ctlens.edge_mask(model, circuit, ablation, reference=reference,
                                  spans=data.spans):
                expected = model(data.clean)
            gated = run_span_gated(model, graph, circuit.mask.double(), ablation, data,
                                   reference)
        torch.testing.assert_close(real(gated, data), real(expected, data), rtol=tol, atol=tol)
    with torch.no_grad():  # the circuit's gates really differ from all-open and all-closed
        half = run_span_gated(model, graph, some.double(), ablation, data, reference)
        full = model(data.clean)
    assert (real(half, data) - real(full, data)).abs().max() > 1e-3


def span_gate_view(gates: torch.Tensor, data) -> torch.Tensor:
    """``[S, R, batch, pos, 1]``: each token's gate (its span's), 1 on padding; a plain
    differentiable function of ``gates`` for `slow_gated_forward`."""
    per_token = gates[:, :, data.spans.clamp(min=0)]
    padding = ~data.attention_mask
    return per_token.masked_fill(padding, 1.0)[..., None]


def test_span_gate_gradients_match_a_slow_rebuild() -> None:
    """Values and every gate's gradient (also through live sender outputs that gated edges
    feed) equal a plain-autograd rebuild with one term per edge, each token's term scaled by
    its span's gate."""
    model = build("gpt2")
    data = spanned(random_task(n=4, seq=6, seed=8))
    graph = Graph.from_model(model, spans=data)
    gen = torch.Generator().manual_seed(5)
    values = torch.rand(graph.dense_shape, generator=gen, dtype=torch.float64)
    weights = torch.randn(*data.clean.shape, model.cfg.d_vocab, generator=gen,
                          dtype=torch.float64)  # every position, so every span is read

    def loss_and_grad(fn) -> tuple[torch.Tensor, torch.Tensor]:
        gates = values.clone().requires_grad_(True)
        logits = fn(gates)
        loss = (real(logits, data) * real(weights, data)).sum()
        loss.backward()
        return real(logits.detach(), data), gates.grad

    with frozen_parameters(model):
        fast, fast_grad = loss_and_grad(
            lambda g: run_span_gated(model, graph, g, "corrupt", data)
        )
        slow, slow_grad = loss_and_grad(
            lambda g: slow_gated_forward(model, graph, span_gate_view(g, data), data.clean,
                                         data.corrupt)
        )
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    valid = graph.dense_valid
    torch.testing.assert_close(fast_grad * valid, slow_grad * valid, rtol=1e-10, atol=1e-12)
    assert fast_grad[valid].abs().min() > 0  # every (edge, span) gate is live


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_span_gate_gradients_pass_gradcheck(ablation) -> None:
    """Finite differences (`torch.autograd.gradcheck`, float64) on a sample of gates spread
    over senders, receivers and spans, the rest held at random values."""
    model = build("gpt2")
    data = spanned(random_task(n=3, seq=6, seed=8))
    graph = Graph.from_model(model, mlp_groups=2, spans=data)
    means = reference_for("mean", model, data, graph)
    gen = torch.Generator().manual_seed(7)
    base = torch.rand(graph.dense_shape, generator=gen, dtype=torch.float64)
    cells = graph.dense_valid.flatten().nonzero()[:, 0]
    chosen = cells[torch.randperm(len(cells), generator=gen)[:24]]
    last = data.attention_mask.sum(1) - 1

    def answer_logits(sample: torch.Tensor) -> torch.Tensor:
        gates = base.flatten().index_put((chosen,), sample).view(graph.dense_shape)
        logits = run_span_gated(model, graph, gates, ablation, data, means)
        return logits[torch.arange(len(data)), last, :5]

    with frozen_parameters(model):
        sample = base.flatten()[chosen].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(answer_logits, (sample,), eps=1e-6, atol=1e-7)


def test_wrong_graph_or_spans_for_a_gated_forward_are_refused() -> None:
    model = build("gpt2")
    data = spanned(random_task(n=4, seq=6, seed=8))
    positional = Graph.from_model(model, spans=data)
    with pytest.raises(ValueError, match="is positional: use .*SpanGatedForward"):
        GatedForward(model, positional, Ablation.ZERO)
    with pytest.raises(ValueError, match="has no spans: use GatedForward"):
        SpanGatedForward(model, Graph.from_model(model), Ablation.ZERO)
    gated = SpanGatedForward(model, positional, Ablation.ZERO)
    with pytest.raises(ValueError, match=r"gates have shape \(11, 27\), expected \(11, 27, 3\)"):
        gated.set_gates(torch.ones(11, 27))
    for bad in (data.spans + 3, data.spans[0]):
        with pytest.raises(ValueError, match=r"span labels must be \[batch, seq\] indices into "
                           r"the graph's spans \['early', 'middle', 'late'\]"):
            gated.set_spans(bad)
    with model.hooks(fwd_hooks=gated.hooks()), torch.no_grad():
        gated.set_gates(torch.ones(positional.dense_shape))
        with pytest.raises(RuntimeError, match=r"need this forward's span labels .* call "
                           r"set_spans\(batch.spans\)"):
            model(data.clean)
        gated.set_spans(data.spans[:2])
        with pytest.raises(RuntimeError, match=r"\[batch, seq\] = \[4, 6\]; set for \[2, 6\]"):
            model(data.clean)


# ------------------------------------------------------------------ learn_circuit


def test_one_span_learns_the_position_free_circuit() -> None:
    """With a single span holding every token, the gates are the position-free gates with a
    span axis of length 1 (same seeded draws); the learned circuits are the same edges and
    the gates agree to float64 rounding (the per-span product sums the same terms over the
    real tokens only, and padding reaches no answer)."""
    model = build("gpt2")
    data = random_task(n=8, seq=7, seed=2)
    labels = torch.zeros_like(data.clean)
    one = replace(data, spans=labels, span_names=("all",))
    options = dict(steps=40, lr=0.3, seed=3, batch_size=4, progress=False)
    free = learn_circuit(model, data, 0.1, **options)
    pos = learn_circuit(model, one, 0.1, graph=Graph.from_model(model, spans=one), **options)
    assert pos.graph.spans == ("all",) and pos.n_edges == free.n_edges
    assert torch.equal(pos.mask[..., 0], free.mask)
    torch.testing.assert_close(pos.scores[..., 0], free.scores, rtol=1e-9, atol=1e-12)
    a, b = pos.metadata["learning"], free.metadata["learning"]
    assert a["faithfulness"] == pytest.approx(b["faithfulness"], rel=1e-9)
    assert a["expected_edges"] == pytest.approx(b["expected_edges"], rel=1e-9)


def planted_spans(data):
    """``data`` with spans ``start`` (its first 3 tokens), ``end`` (its last real token, where
    the answer is read) and ``other`` (the rest)."""
    labels = torch.full_like(data.clean, 2)
    labels[:, :3] = 0
    labels[torch.arange(len(data)), data.attention_mask.sum(1) - 1] = 1
    return replace(data, spans=labels, span_names=("start", "end", "other"))


@pytest.mark.parametrize(
    ("ablation", "objective", "mlp_groups"), [("corrupt", "kl", 1), ("mean", "metric", 2)]
)
def test_learned_span_gates_recover_a_planted_positional_circuit(ablation, objective, mlp_groups):
    """The planted model's two heads attend uniformly, so their v inputs matter at every
    span, while the logits read only the answer position: the positional circuit is each
    v edge at all three spans and each logits edge at ``end`` only (checked against exact
    per-span patching), and the learned gates find exactly those pairs."""
    model = planted_model()
    data = planted_spans(random_task(n=16, seq=7, seed=2))
    graph = Graph.from_model(model, mlp_groups=mlp_groups, spans=data)
    pairs = [(s, r, span) for s, r in PLANTED
             for span in (("end",) if r == "logits" else graph.spans)]
    planted = Circuit.from_edges(graph, pairs)
    exact = ctlens.attribute(
        model, data, method="exact", ablation=ablation, progress=False, graph=graph
    ).scores
    assert (exact.abs() > 1e-9).logical_and(graph.dense_valid).equal(planted.mask)
    circuit = learn_circuit(
        model, data, len(pairs), ablation, steps=200, lr=0.3, objective=objective,
        graph=graph, progress=False,
    )
    assert circuit == planted
    assert circuit.metadata["learning"]["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    outside = graph.dense_valid & ~planted.mask
    assert circuit.scores[planted.mask].min() > circuit.scores[outside].max()


@pytest.mark.parametrize(("ablation", "mlp_groups"), [("corrupt", 1), ("mean", 2)])
def test_reported_faithfulness_is_the_saved_positional_circuits(
    ablation, mlp_groups, tmp_path
) -> None:
    """A positional circuit of exactly ``top_n`` (edge, span) pairs, counted as
    `Circuit.from_scores` counts them; its reported faithfulness equals `faithfulness`
    recomputed from the file; its scores rank it."""
    model = build("gpt2")
    data = spanned(random_task(n=10, seq=7, seed=6))
    graph = Graph.from_model(model, mlp_groups=mlp_groups, spans=data)
    circuit = learn_circuit(model, data, 0.05, ablation, steps=60, lr=0.3, batch_size=4,
                            graph=graph, progress=False)
    assert circuit.graph == graph and circuit.mask.shape == graph.dense_shape
    n_pairs = round(0.05 * graph.n_edges)
    assert circuit.n_edges == n_pairs == circuit.metadata["learning"]["top_n"]
    assert not (circuit.mask & ~graph.dense_valid).any()
    loaded = Circuit.load(circuit.save(tmp_path / "learned.json"), model=model)
    assert loaded == circuit and torch.equal(loaded.scores, circuit.scores)
    recomputed = ctlens.faithfulness(model, data, loaded, ablation, batch_size=4)
    assert loaded.metadata["learning"]["faithfulness"] == recomputed.faithfulness
    scores = ctlens.EdgeScores(loaded.scores, loaded.graph)
    assert Circuit.from_scores(scores, top_n=n_pairs) == loaded
    spans_used = circuit.mask.flatten(0, 1).any(0)
    assert spans_used.sum() >= 2, "the circuit keeps pairs at more than one span"


def test_positional_learning_leaves_the_model_as_found_and_is_seeded() -> None:
    model = build("gpt2")
    data = spanned(random_task(n=6, seq=7, seed=3))
    graph = Graph.from_model(model, spans=data)
    mixed_state(model)
    before = model_state(model)
    runs = [
        learn_circuit(model, data, 0.1, steps=30, seed=seed, lr=0.3, graph=graph,
                      progress=False)
        for seed in (4, 4)
    ]
    assert_state(model, before)
    assert runs[0] == runs[1] and torch.equal(runs[0].scores, runs[1].scores)


def test_positional_learning_refuses_data_without_the_graphs_spans() -> None:
    model = build("gpt2")
    data = spanned(random_task(n=6, seq=7, seed=3))
    graph = Graph.from_model(model, spans=data)
    mixed_state(model)
    before = model_state(model)
    cases = [
        (random_task(n=6, seq=7, seed=3), r"is positional with spans \['early', 'middle', "
         r"'late'\] but the task data has no spans"),
        (spanned(data, n_spans=2), r"the spans do not match: .* but the task data has "
         r"\['early', 'middle'\]"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            learn_circuit(model, bad, 5, graph=graph, steps=3, progress=False)
    assert_state(model, before)
