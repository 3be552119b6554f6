"""Learned circuits (`ctlens.learn_circuit`) and the gated forward they train through.

The gated forward is checked against `edge_mask` (binary gates, including all-open and
all-closed) and against a slow per-sender rebuild for gradients; `learn_circuit` against a
hand-built model whose circuit is known by construction, and against `faithfulness`
recomputed from the saved circuit file.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, random_task, tiny_gpt2_module

import ctlens
from ctlens import Circuit, Graph
from ctlens.bridge.names import HookLayout
from ctlens.learning import GatedForward, TargetNotReachedError, learn_circuit
from ctlens.types import Ablation, NodeKind

ABLATIONS = ["corrupt", "mean", "zero"]


def run_gated(model, graph: Graph, gates, ablation: str, data, means=None) -> torch.Tensor:
    """Logits of ``model`` on ``data.clean`` with every edge scaled by ``gates``."""
    kind = Ablation.parse(ablation)
    gated = GatedForward(model, graph, kind, means if kind is Ablation.MEAN else None)
    with model.hooks(fwd_hooks=gated.hooks()):
        if kind is Ablation.CORRUPT:
            gated.use_reference(gated.record_reference(data.corrupt))
        gated.set_gates(gates)
        return model(data.clean)


def reference_for(ablation: str, model, data, graph: Graph):
    """What `edge_mask` takes as ``reference=`` for the same ablation as `run_gated`."""
    if ablation == "mean":
        return ctlens.mean_activations(model, data, graph=graph)
    return data.corrupt if ablation == "corrupt" else None


def assert_same(actual: torch.Tensor, expected: torch.Tensor, model) -> None:
    """Equal up to float64 rounding (Llama's RMSNorm rounds through float32)."""
    tol = 2e-6 if "Llama" in type(model.original_model).__name__ else 1e-12
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------ the gated forward


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_gates_at_one_are_the_full_model_bit_for_bit(tiny_model, task, ablation) -> None:
    graph = Graph.from_model(tiny_model)
    means = reference_for("mean", tiny_model, task, graph)
    ones = torch.ones(graph.n_senders, graph.n_receivers)
    with torch.no_grad():
        plain = tiny_model(task.clean)
        assert torch.equal(run_gated(tiny_model, graph, ones, ablation, task, means), plain)
    # with autograd on, through the custom function, the values are the same
    assert torch.equal(
        run_gated(tiny_model, graph, ones.requires_grad_(True), ablation, task, means), plain
    )


@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize("mlp_groups", [1, 2])
def test_binary_gates_are_edge_mask_exactly(tiny_model, task, ablation, mlp_groups) -> None:
    """Gates at 0 give the ablated model (the empty circuit), and 0/1 gates the circuit they
    spell, equal to `edge_mask` - and at 0, equal to `faithfulness`'s ablated run."""
    graph = Graph.from_model(tiny_model, mlp_groups=mlp_groups)
    reference = reference_for(ablation, tiny_model, task, graph)
    gen = torch.Generator().manual_seed(3)
    some = (torch.rand(graph.n_senders, graph.n_receivers, generator=gen) < 0.5) & graph.valid
    for circuit in (Circuit.empty(graph), Circuit(graph, some), Circuit.full(graph)):
        with torch.no_grad():
            with ctlens.edge_mask(tiny_model, circuit, ablation, reference=reference):
                expected = tiny_model(task.clean)
            gates = circuit.mask.double()
            gated = run_gated(tiny_model, graph, gates, ablation, task, reference)
        assert_same(gated, expected, tiny_model)
    empty = ctlens.faithfulness(tiny_model, task, Circuit.empty(graph), ablation, reference)
    closed = torch.zeros(graph.n_senders, graph.n_receivers)
    with torch.no_grad():
        logits = run_gated(tiny_model, graph, closed, ablation, task, reference)
        plain = tiny_model(task.clean)
    metric = task.metric_values(logits, plain).mean().item()
    assert metric == pytest.approx(empty.metric_empty, abs=1e-6)  # faithfulness is fp32
    if ablation == "corrupt":
        with torch.no_grad():
            assert_same(logits, tiny_model(task.corrupt), tiny_model)


def slow_gated_forward(model, graph: Graph, gates: torch.Tensor, clean, corrupt) -> torch.Tensor:
    """Every receiver input rebuilt one sender at a time with plain autograd:
    ``x_r + sum_s (1 - g_sr) (a_s^ref - a_s)`` (corrupt ablation, one MLP node per layer)."""
    layout = HookLayout.from_model(model)
    senders = graph.senders

    def outputs(tokens, keep: dict[str, torch.Tensor]):
        def grab_input(act, hook):
            keep["input"] = act if hook.name == layout.input_hooks[0] else keep["input"] + act

        def grab(layer):
            def heads(act, hook):
                for h in range(graph.spec.n_heads):
                    keep[f"a{layer}.h{h}"] = act[:, :, h]

            def mlp(act, hook):
                keep[f"m{layer}"] = act

            return heads, mlp

        hooks = [(name, grab_input) for name in layout.input_hooks]
        for layer in range(graph.spec.n_layers):
            heads, mlp = grab(layer)
            hooks += [(layout.head_out(layer), heads), (layout.mlp_out(layer), mlp)]
        return hooks

    ref: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model.run_with_hooks(corrupt, fwd_hooks=outputs(corrupt, ref))
    live: dict[str, torch.Tensor] = {}

    def rebuild(columns: list[int]):
        def fn(x, hook):
            parts = []
            for offset, j in enumerate(columns):
                new = x if x.ndim == 3 else x[:, :, offset]
                for i in range(graph.upstream[j]):
                    new = new + (1 - gates[i, j]) * (ref[senders[i]] - live[senders[i]])
                parts.append(new)
            return parts[0] if x.ndim == 3 else torch.stack(parts, 2)

        return fn

    hooks = outputs(clean, live)
    for layer in range(graph.spec.n_layers):
        for kind in (NodeKind.Q, NodeKind.K, NodeKind.V, NodeKind.MLP):
            columns = list(range(graph.n_receivers))[graph.receiver_slice(layer, kind)]
            name = layout.mlp_in(layer) if kind is NodeKind.MLP else layout.qkv_in(layer, kind)
            hooks.append((name, rebuild(columns)))
    hooks.append((layout.logits_in, rebuild([graph.n_receivers - 1])))
    return model.run_with_hooks(clean, fwd_hooks=hooks)


def test_gate_gradients_match_a_slow_rebuild(tiny_model, task) -> None:
    """Values and gradients (gates, through live sender outputs of gated upstream senders)
    equal a plain-autograd rebuild with one term per edge."""
    graph = Graph.from_model(tiny_model)
    gen = torch.Generator().manual_seed(5)
    values = torch.rand(graph.n_senders, graph.n_receivers, generator=gen, dtype=torch.float64)
    weights = torch.randn(task.clean.shape[0], VOCAB, generator=gen, dtype=torch.float64)

    def loss_and_grad(fn) -> tuple[torch.Tensor, torch.Tensor]:
        gates = values.clone().requires_grad_(True)
        logits = fn(gates)
        loss = (logits[:, -1] * weights).sum()
        loss.backward()
        return logits.detach(), gates.grad

    with ctlens.learning.learn.frozen_parameters(tiny_model):
        fast, fast_grad = loss_and_grad(
            lambda g: run_gated(tiny_model, graph, g, "corrupt", task)
        )
        slow, slow_grad = loss_and_grad(
            lambda g: slow_gated_forward(tiny_model, graph, g, task.clean, task.corrupt)
        )
    assert_same(fast, slow, tiny_model)
    assert_same(fast_grad * graph.valid, slow_grad * graph.valid, tiny_model)
    assert fast_grad[graph.valid].abs().min() > 0  # every edge's gate is live


# ------------------------------------------------------------------ learn_circuit


PLANTED = [
    ("input", "a0.h1.v"),
    ("input", "a1.h2.v"),
    ("a0.h1", "a1.h2.v"),
    ("input", "logits"),
    ("a0.h1", "logits"),
    ("a1.h2", "logits"),
]


def planted_model():
    """A 2-layer GPT-2 whose only working parts are heads a0.h1 and a1.h2, both attending
    uniformly (zero W_Q, W_K): every other head writes nothing, every MLP writes only its
    bias, so exactly the `PLANTED` edges change the output."""
    module = tiny_gpt2_module(seed=2, dtype=torch.float64)
    d, heads = module.config.n_embd, module.config.n_head
    width = d // heads
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.transformer.wte.weight.normal_(0, 1.0, generator=gen)
        for layer, keep in ((0, 1), (1, 2)):
            block = module.transformer.h[layer]
            block.mlp.c_proj.weight.zero_()
            own = slice(keep * width, (keep + 1) * width)
            for h in range(heads):
                cols = slice(h * width, (h + 1) * width)
                if h != keep:
                    block.attn.c_proj.weight[cols] = 0.0
            block.attn.c_attn.weight[:, : 2 * d] = 0.0  # q and k of every head
            block.attn.c_attn.bias[: 2 * d] = 0.0
            block.attn.c_attn.weight[:, 2 * d :][:, own].normal_(0, 1.0, generator=gen)
            block.attn.c_proj.weight[own].normal_(0, 1.0, generator=gen)
    return ctlens.load_model(module)


@pytest.mark.parametrize(
    ("ablation", "objective", "mlp_groups"),
    [("corrupt", "kl", 1), ("mean", "metric", 1), ("zero", "kl", 2)],
)
def test_learned_mask_recovers_a_planted_circuit(ablation, objective, mlp_groups) -> None:
    model = planted_model()
    data = random_task(n=16, seq=7, seed=2)
    graph = Graph.from_model(model, mlp_groups=mlp_groups)
    exact = ctlens.attribute(
        model, data, method="exact", ablation=ablation, progress=False, graph=graph
    ).scores
    planted = Circuit.from_edges(graph, PLANTED)
    assert (exact.abs() > 1e-9).logical_and(graph.valid).equal(planted.mask)  # the construction
    circuit = learn_circuit(
        model, data, len(PLANTED), ablation, steps=200, lr=0.3, objective=objective,
        graph=graph, progress=False,
    )
    assert circuit == planted
    assert circuit.metadata["learning"]["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert circuit.scores is not None
    assert circuit.scores[planted.mask].min() > circuit.scores[graph.valid & ~planted.mask].max()


def model_state(model) -> tuple[list, list, list, list, int]:
    """Everything `learn_circuit` must leave as it was: values, flags, grads, modes, hooks."""
    params = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    hooks = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    return params, flags, grads, modes, hooks


def assert_state(model, before) -> None:
    after = model_state(model)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert before[1] == after[1]
    assert all(
        (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(before[2], after[2], strict=True)
    )
    assert before[3:] == after[3:]


def mixed_state(model) -> None:
    """Some submodules in train mode, some parameters frozen, one with a gradient."""
    model.eval()
    model.blocks[0].train()
    params = list(model.parameters())
    params[1].requires_grad_(False)
    params[2].grad = torch.ones_like(params[2])


def test_learning_is_seeded_and_leaves_the_model_as_found(tiny_model, task) -> None:
    mixed_state(tiny_model)
    before = model_state(tiny_model)
    runs = [
        learn_circuit(tiny_model, task, 0.1, steps=40, seed=seed, lr=0.3, progress=False)
        for seed in (7, 7, 8)
    ]
    assert_state(tiny_model, before)
    first, again, other = runs
    assert first == again and torch.equal(first.scores, again.scores)
    assert not torch.equal(first.scores, other.scores)
    assert first.metadata["learning"]["history"] == again.metadata["learning"]["history"]
    assert first.n_edges == round(0.1 * first.graph.n_edges)


def test_reported_faithfulness_is_the_saved_circuits(tiny_model, tmp_path) -> None:
    """The faithfulness `learn_circuit` reports equals `faithfulness` recomputed from the
    circuit read back from its file; the file keeps the learned scores and settings."""
    data = random_task(n=12, seed=6)
    circuit = learn_circuit(
        tiny_model, data, 30, "mean", steps=60, lr=0.3, batch_size=5, progress=False
    )
    loaded = Circuit.load(circuit.save(tmp_path / "learned.json"), model=tiny_model)
    assert loaded == circuit and torch.equal(loaded.scores, circuit.scores)
    learning = loaded.metadata["learning"]
    recomputed = ctlens.faithfulness(tiny_model, data, loaded, "mean", batch_size=5)
    assert learning["faithfulness"] == recomputed.faithfulness
    assert learning["top_n"] == loaded.n_edges == 30
    assert (learning["ablation"], learning["steps"], learning["objective"]) == ("mean", 60, "kl")
    assert [h["step"] for h in learning["history"]][-1] == 60
    # the scores rank the circuit: from_scores on them gives the same edges
    assert Circuit.from_scores(_as_scores(loaded), top_n=30) == loaded


def _as_scores(circuit: Circuit) -> ctlens.EdgeScores:
    return ctlens.EdgeScores(circuit.scores, circuit.graph)


def test_progress_shows_size_and_faithfulness(tiny_model, task, capsys) -> None:
    learn_circuit(tiny_model, task, 0.2, steps=100, lr=0.3, progress=True)
    err = capsys.readouterr().err
    assert "learn_circuit" in err and "edges=" in err and "faith=" in err


def test_bad_inputs_and_unreachable_targets_are_refused(tiny_model, task) -> None:
    mixed_state(tiny_model)
    before = model_state(tiny_model)
    n_edges = Graph.from_model(tiny_model).n_edges
    cases = [
        (dict(top_n=0), "top_n must be a positive integer"),
        (dict(top_n=n_edges + 1), "out of range"),
        (dict(top_n=1.5), "strictly between 0 and 1"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(objective="loss"), "unknown objective"),
        (dict(ablation="noise"), "unknown ablation"),
        (dict(lr=0.0), "lr must be a positive number"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(ablation="zero", reference=task.corrupt), "zero ablation takes no reference"),
        (dict(graph=Graph.from_model(tiny_model, spans=("a", "b"))), "task data has no spans"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            learn_circuit(tiny_model, task, **{"top_n": 5, "progress": False, **kwargs})
    with pytest.raises(TypeError, match="TaskData"):
        learn_circuit(tiny_model, task.clean, 5)
    with pytest.raises(TargetNotReachedError, match="did not reach the target of 5 edges"):
        learn_circuit(tiny_model, task, 5, steps=3, progress=False)
    same = ctlens.TaskData(clean=task.clean, corrupt=task.clean, correct=task.correct,
                           wrong=task.wrong, attention_mask=task.attention_mask)
    with pytest.raises(ValueError, match="faithfulness is undefined"):
        learn_circuit(tiny_model, same, 5, steps=3, progress=False)
    assert_state(tiny_model, before)
