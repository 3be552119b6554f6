"""Forward edge masking, faithfulness and gradient restriction, checked against independent
computations: plain forwards with replaced senders, hand-made single-edge patches, a slow
per-receiver rebuild of every input, and TransformerLens 4.3's own faithfulness oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, random_task, tiny_gpt2_module, tiny_llama_module

import ctlens
from ctlens import Circuit, EdgeScores, Graph
from ctlens.bridge.names import HookLayout
from ctlens.masking import MIB_FRACTIONS, curve_areas, parameter_rules
from ctlens.types import NodeKind


def random_circuit(graph: Graph, fraction: float = 0.4, seed: int = 0) -> Circuit:
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.rand(graph.n_senders, graph.n_receivers, generator=gen) < fraction) & graph.valid
    return Circuit(graph, keep)


def sender_outputs(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every sender's output ``[b, p, d]`` by name, from a plain forward."""
    graph = Graph.from_model(model)
    layout = HookLayout.from_model(model)
    names = [*layout.input_hooks]
    for layer in range(graph.spec.n_layers):
        names += [layout.head_out(layer), layout.mlp_out(layer)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    out = {"input": sum(cache[n] for n in layout.input_hooks if n in cache.cache_dict)}
    for layer in range(graph.spec.n_layers):
        for h in range(graph.spec.n_heads):
            out[f"a{layer}.h{h}"] = cache[layout.head_out(layer)][:, :, h]
        out[f"m{layer}"] = cache[layout.mlp_out(layer)]
    return out


def assert_same(actual: torch.Tensor, expected: torch.Tensor, model) -> None:
    """Equal up to float64 rounding; Llama's RMSNorm computes in float32 even for float64
    inputs, so there rounding differences of 1e-16 can surface at float32 size."""
    llama = "Llama" in type(model.original_model).__name__
    tol = 2e-6 if llama else 1e-12
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def receiver_hook(graph: Graph, receiver: str) -> tuple[str, int | None]:
    """The hook point of a receiver and its index on the node axis (None: no node axis)."""
    node = graph.receiver_nodes[graph.receiver_index[receiver]]
    if node.kind is NodeKind.LOGITS:
        return HookLayout.logits_in, None
    if node.kind is NodeKind.MLP:
        return HookLayout.mlp_in(node.layer), None
    return HookLayout.qkv_in(node.layer, node.kind), node.head


# ------------------------------------------------------------------ edge_mask: forward values


def every_sender_replaced(model, tokens: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """A plain forward with every sender's output replaced by ``means`` ``[n_senders, p, d]``:
    the empty circuit, computed without ctlens' masking hooks."""
    graph = Graph.from_model(model)
    layout = HookLayout.from_model(model)

    def put(value: torch.Tensor):
        return lambda act, hook: value.expand_as(act).to(act.dtype).clone()

    hooks = [(layout.input_hooks[0], put(means[0][None]))]
    hooks += [(name, put(torch.zeros(1))) for name in layout.input_hooks[1:]]
    for layer in range(graph.spec.n_layers):
        heads = means[graph.sender_slice(layer)].permute(1, 0, 2)[None]  # [1, p, H, d]
        hooks.append((layout.head_out(layer), put(heads)))
        hooks.append((layout.mlp_out(layer), put(means[graph.mlp_sender(layer)][None])))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


@pytest.mark.parametrize("ablation", ["zero", "mean", "corrupt"])
def test_full_circuit_is_the_plain_model_and_the_hooks_are_live(
    tiny_model, task, ablation
) -> None:
    """Keeping every edge changes nothing under any ablation. So that this is not a mask
    that never ran, the same installed hooks, switched to the empty circuit, must give the
    independently computed empty-circuit model (zero: every sender output replaced by 0)."""
    graph = Graph.from_model(tiny_model)
    plain = tiny_model(task.clean)
    reference = {"zero": None, "mean": task, "corrupt": task.corrupt}[ablation]
    with ctlens.edge_mask(tiny_model, Circuit.full(graph), ablation, reference) as mask:
        assert sum(len(hp.fwd_hooks) for hp in tiny_model.hook_dict.values()) > 0
        assert torch.equal(tiny_model(task.clean), plain)
        mask.set_circuit(Circuit.empty(graph))
        empty = tiny_model(task.clean)
    assert not torch.allclose(empty, plain)
    if ablation == "zero":
        zeros = torch.zeros(graph.n_senders, task.clean.shape[1], tiny_model.cfg.d_model)
        assert_same(empty, every_sender_replaced(tiny_model, task.clean, zeros), tiny_model)


def test_empty_circuit_corrupt_is_the_corrupt_run(tiny_model, task) -> None:
    graph = Graph.from_model(tiny_model)
    with ctlens.edge_mask(tiny_model, Circuit.empty(graph), "corrupt", reference=task.corrupt):
        masked = tiny_model(task.clean)
    assert_same(masked, tiny_model(task.corrupt), tiny_model)


def test_empty_circuit_mean_is_every_sender_replaced_by_its_mean(tiny_model, task) -> None:
    graph = Graph.from_model(tiny_model)
    means = ctlens.mean_activations(tiny_model, task).to(torch.float64)
    expected = every_sender_replaced(tiny_model, task.clean, means)
    with ctlens.edge_mask(tiny_model, Circuit.empty(graph), "mean", reference=means):
        masked = tiny_model(task.clean)
    assert_same(masked, expected, tiny_model)


@pytest.mark.parametrize("edge_index", range(4))
def test_one_edge_removed_is_a_hand_made_patch(tiny_model, task, edge_index: int) -> None:
    graph = Graph.from_model(tiny_model)
    kv = "g1" if graph.spec.grouped else "h3"
    edge = [("a0.h1", "a1.h2.q"), ("input", "m1"), ("m0", f"a1.{kv}.k"), ("a1.h3", "logits")][
        edge_index
    ]
    sender, receiver = edge
    ref = sender_outputs(tiny_model, task.corrupt)[sender]
    clean = sender_outputs(tiny_model, task.clean)[sender]
    hook_name, column = receiver_hook(graph, receiver)

    def patch(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        if column is None:
            x += ref - clean
        else:
            x[:, :, column] += ref - clean
        return x

    expected = tiny_model.run_with_hooks(task.clean, fwd_hooks=[(hook_name, patch)])
    circuit = Circuit.full(graph) - Circuit.from_edges(graph, [edge])
    with ctlens.edge_mask(tiny_model, circuit, "corrupt", reference=task.corrupt):
        masked = tiny_model(task.clean)
    assert_same(masked, expected, tiny_model)
    assert not torch.allclose(masked, tiny_model(task.clean))


def slow_masked_forward(model, circuit: Circuit, clean: torch.Tensor, corrupt: torch.Tensor):
    """Rebuild every receiver input from sender outputs, one receiver and sender at a time:
    x_r' = (x_r - sum_s a_s) + sum_{s in circuit} a_s + sum_{s not in circuit} a_s^ref."""
    graph = circuit.graph
    ref = sender_outputs(model, corrupt)
    layout = HookLayout.from_model(model)
    live: dict[str, torch.Tensor] = {}

    def grab_input(act, hook):
        live["input"] = act if hook.name == layout.input_hooks[0] else live["input"] + act

    def grab_heads(layer):
        def fn(act, hook):
            for h in range(graph.spec.n_heads):
                live[f"a{layer}.h{h}"] = act[:, :, h]

        return fn

    def grab_mlp(layer):
        def fn(act, hook):
            live[f"m{layer}"] = act

        return fn

    def rebuild(columns):
        def fn(x, hook):
            x = x.clone()
            for offset, j in enumerate(columns):
                inputs = x if x.ndim == 3 else x[:, :, offset]
                upstream = [graph.senders[i] for i in range(graph.upstream[j])]
                new = inputs - sum(live[s] for s in upstream)  # the constant biases
                for i, s in enumerate(upstream):
                    new = new + (live[s] if circuit.mask[i, j] else ref[s].detach())
                if x.ndim == 3:
                    x = new
                else:
                    x = torch.cat([x[:, :, :offset], new[:, :, None], x[:, :, offset + 1 :]], 2)
            return x

        return fn

    hooks = [(name, grab_input) for name in layout.input_hooks]
    for layer in range(graph.spec.n_layers):
        for kind in (NodeKind.Q, NodeKind.K, NodeKind.V):
            cols = range(*graph.receiver_slice(layer, kind).indices(graph.n_receivers))
            hooks.append((layout.qkv_in(layer, kind), rebuild(list(cols))))
        hooks.append((layout.head_out(layer), grab_heads(layer)))
        hooks.append(
            (layout.mlp_in(layer), rebuild([graph.receiver_slice(layer, NodeKind.MLP).start]))
        )
        hooks.append((layout.mlp_out(layer), grab_mlp(layer)))
    hooks.append((layout.logits_in, rebuild([graph.n_receivers - 1])))
    return model.run_with_hooks(clean, fwd_hooks=hooks)


@pytest.mark.parametrize("fraction", [0.05, 0.4, 0.9])
def test_edge_mask_matches_slow_rebuild_values_and_gradients(tiny_model, task, fraction) -> None:
    """Small circuits use the "kept" form (x - S_n + ...), large ones the "excluded" form."""
    graph = Graph.from_model(tiny_model)
    circuit = random_circuit(graph, fraction, seed=1)

    def grads(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tiny_model.zero_grad(set_to_none=True)
        logits = fn()
        task.metric_values(logits).sum().backward()
        return logits.detach(), [
            p.grad.clone() for p in tiny_model.parameters() if p.grad is not None
        ]

    slow_logits, slow_grads = grads(
        lambda: slow_masked_forward(tiny_model, circuit, task.clean, task.corrupt)
    )
    with ctlens.edge_mask(tiny_model, circuit, "corrupt", reference=task.corrupt) as mask:
        fast_logits, fast_grads = grads(lambda: tiny_model(task.clean))
        kinds = {group.kind for group in mask._plan.groups.values()}
    assert ("kept" if fraction < 0.5 else "excluded") in kinds  # both forms are exercised
    tiny_model.zero_grad(set_to_none=True)
    assert_same(fast_logits, slow_logits, tiny_model)
    assert len(fast_grads) == len(slow_grads) > 0
    for fast, slow in zip(fast_grads, slow_grads, strict=True):
        assert_same(fast, slow, tiny_model)


def test_edge_mask_controls_and_restoration(tiny_model, task) -> None:
    graph = Graph.from_model(tiny_model)
    before = [(p, p.requires_grad) for p in tiny_model.parameters()]
    tiny_model.train()
    circuit = random_circuit(graph, seed=2)
    plain = tiny_model(task.clean)
    with (
        pytest.raises(RuntimeError, match="boom"),
        ctlens.edge_mask(tiny_model, circuit, "corrupt") as mask,
    ):
        with pytest.raises(RuntimeError, match="set_reference"):
            tiny_model(task.clean)
        mask.set_reference(task.corrupt)
        assert tiny_model.training  # the reference forward restored the mode
        with pytest.raises(RuntimeError, match="set_reference"):
            tiny_model(task.clean[:2])
        masked = tiny_model(task.clean)
        assert not torch.allclose(masked, plain)  # the mask is live, so paused() means something
        with mask.paused():
            assert torch.equal(tiny_model(task.clean), plain)
        mask.set_circuit(Circuit.full(graph))
        assert torch.equal(tiny_model(task.clean), plain)
        mask.set_circuit(circuit)
        assert torch.equal(tiny_model(task.clean), masked)
        raise RuntimeError("boom")
    assert all(len(hp.fwd_hooks) == 0 for hp in tiny_model.hook_dict.values())
    assert tiny_model.training
    assert all(p.requires_grad == flag for p, flag in before)
    assert torch.equal(tiny_model(task.clean), plain)
    tiny_model.eval()


def test_mixed_train_eval_modes_come_back_module_by_module(tiny_model, task) -> None:
    """Passes run in eval mode, then every module gets its own mode back, not the
    top-level one (issue 16: a model with some modules in eval mode came back all in train)."""
    graph = Graph.from_model(tiny_model)
    tiny_model.train()
    tiny_model.blocks[0].eval()
    tiny_model.ln_final.eval()
    modes = {name: m.training for name, m in tiny_model.named_modules()}
    assert set(modes.values()) == {True, False}

    def unchanged() -> bool:
        return modes == {name: m.training for name, m in tiny_model.named_modules()}

    seen: list[bool] = []
    probe = ("blocks.0.hook_mlp_in", lambda x, hook: seen.append(tiny_model.training))
    with tiny_model.hooks(fwd_hooks=[probe]):
        ctlens.attribute(tiny_model, task, progress=False)
    assert seen and not any(seen)  # the passes themselves ran in eval mode
    assert unchanged()
    ctlens.faithfulness(tiny_model, task, random_circuit(graph))
    assert unchanged()
    ctlens.mean_activations(tiny_model, task)
    assert unchanged()
    with ctlens.edge_mask(tiny_model, random_circuit(graph), "corrupt", task.corrupt) as mask:
        assert unchanged()
        mask.set_reference(task.corrupt)
        assert unchanged()
    assert unchanged()
    tiny_model.eval()


def test_edge_mask_bad_inputs(tiny_model, task) -> None:
    graph = Graph.from_model(tiny_model)
    other = Circuit.empty(Graph(ctlens.GraphSpec(5, 2, 2)))
    with (
        pytest.raises(ValueError, match="another model's graph"),
        ctlens.edge_mask(tiny_model, other, "zero"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="needs a reference"),
        ctlens.edge_mask(tiny_model, Circuit.empty(graph), "mean"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="takes no reference"),
        ctlens.edge_mask(tiny_model, Circuit.empty(graph), "zero", reference=task.clean),
    ):
        pass
    with (
        pytest.raises(ValueError, match="unknown ablation"),
        ctlens.edge_mask(tiny_model, Circuit.empty(graph), "random"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="outside the vocabulary"),
        ctlens.edge_mask(tiny_model, Circuit.empty(graph), "corrupt", reference=task.clean + VOCAB),
    ):
        pass
    with (
        pytest.raises(TypeError, match="Circuit"),
        ctlens.edge_mask(tiny_model, graph.valid, "zero"),
    ):  # type: ignore[arg-type]
        pass
    short = ctlens.mean_activations(tiny_model, task.clean[:, :3])
    with (
        ctlens.edge_mask(tiny_model, Circuit.empty(graph), "mean", reference=short),
        pytest.raises(RuntimeError, match="positions"),
    ):
        tiny_model(task.clean)
    assert all(len(hp.fwd_hooks) == 0 for hp in tiny_model.hook_dict.values())


# ------------------------------------------------------------------ one reference resolver


def _entry_points(model, data):
    """attribute, faithfulness and edge_mask, each called with (ablation, reference)."""
    empty = Circuit.empty(Graph.from_model(model))

    def mask(ablation, reference):
        with ctlens.edge_mask(model, empty, ablation, reference):
            pass

    return {
        "attribute": lambda a, r: ctlens.attribute(
            model, data, ablation=a, reference=r, progress=False
        ),
        "faithfulness": lambda a, r: ctlens.faithfulness(model, data, empty, a, r),
        "edge_mask": mask,
    }


@pytest.mark.parametrize(
    ("ablation", "bad", "error", "match"),
    [
        ("zero", "clean", ValueError, "zero ablation takes no reference"),
        ("corrupt", "task", TypeError, "not a TaskData"),
        ("corrupt", "float", TypeError, r"token ids \[batch, seq\]"),
        ("corrupt", "vocab", ValueError, "outside the vocabulary"),
        ("mean", "means", ValueError, "precomputed means must be"),
        ("mean", "text", TypeError, "mean ablation needs reference="),
    ],
)
def test_one_resolver_reads_reference_alike_everywhere(
    tiny_model, task, ablation, bad, error, match
) -> None:
    reference = {
        "clean": task.clean,
        "task": task,
        "float": task.corrupt.double(),
        "vocab": task.corrupt + VOCAB,
        "means": torch.zeros(2, task.clean.shape[1], 32),
        "text": "some prompts",
    }[bad]
    for name, call in _entry_points(tiny_model, task).items():
        with pytest.raises(error, match=match):
            call(ablation, reference)
        assert all(len(hp.fwd_hooks) == 0 for hp in tiny_model.hook_dict.values()), name


def test_mean_default_is_the_task_and_edge_mask_says_what_to_pass(tiny_model, task) -> None:
    """faithfulness' default mean reference (the clean prompts) is what edge_mask computes
    from reference=task; edge_mask, which has no task, asks for one instead of guessing."""
    graph = Graph.from_model(tiny_model)
    circuit = random_circuit(graph, seed=5)
    result = ctlens.faithfulness(tiny_model, task, circuit, "mean", batch_size=None)
    with torch.no_grad(), ctlens.edge_mask(tiny_model, circuit, "mean", reference=task):
        masked = task.metric_values(tiny_model(task.clean)).mean().item()
    assert result.metric_circuit == pytest.approx(masked, abs=1e-6)
    assert masked != pytest.approx(result.metric_full, abs=1e-6)  # the mask did something
    with (
        pytest.raises(ValueError, match=r"needs a reference.*mean_activations\(model, data\)"),
        ctlens.edge_mask(tiny_model, circuit, "mean"),
    ):
        pass


def test_mean_over_one_example_is_refused_not_silently_zero(tiny_model, task) -> None:
    """The mean of one prompt is that prompt: every a_ref - a_clean would be 0."""
    one = task[:1]
    graph = Graph.from_model(tiny_model)
    for name, call in _entry_points(tiny_model, one).items():
        if name == "edge_mask":
            continue  # no task data there: its reference is always explicit
        with pytest.raises(ValueError, match="mean ablation over one example"):
            call("mean", None)
        with pytest.raises(ValueError, match="mean ablation over one example"):
            call("mean", one.clean)
    other = ctlens.attribute(tiny_model, one, ablation="mean", reference=task[1:], progress=False)
    assert bool(other.scores[graph.valid].abs().gt(0).any())


# ------------------------------------------------------------------ faithfulness


def test_faithfulness_endpoints_are_independent_values(tiny_model) -> None:
    data = random_task(n=7, seed=4)
    graph = Graph.from_model(tiny_model)
    circuit = random_circuit(graph, seed=3)
    result = ctlens.faithfulness(tiny_model, data, circuit, "corrupt", batch_size=3)
    with torch.no_grad():
        full = data.metric_values(tiny_model(data.clean)).mean().item()
        corrupt = data.metric_values(tiny_model(data.corrupt)).mean().item()
    assert result.metric_full == pytest.approx(full, abs=1e-6)  # metrics are fp32
    assert result.metric_empty == pytest.approx(corrupt, abs=1e-6)
    assert result.faithfulness == pytest.approx(
        (result.metric_circuit - result.metric_empty) / (result.metric_full - result.metric_empty),
        abs=1e-12,
    )
    assert (result.n_edges, result.n_total_edges, result.n_examples) == (
        circuit.n_edges,
        graph.n_edges,
        7,
    )
    with pytest.raises(AttributeError):
        result.faithfulness = 0.0  # type: ignore[misc]
    whole = ctlens.faithfulness(tiny_model, data, Circuit.full(graph), "mean")
    assert whole.faithfulness == pytest.approx(1.0, abs=1e-9)
    assert ctlens.faithfulness(tiny_model, data, Circuit.empty(graph), "zero").faithfulness == 0


def test_faithfulness_agrees_with_transformer_lens_oracle() -> None:
    """TransformerLens 4.3's ablate-outside faithfulness, one pair at a time (GPT-2 only:
    the oracle has no grouped-query attention)."""
    from transformer_lens.tools.analysis import attribution_patching as tl

    model = ctlens.load_model(tiny_gpt2_module(dtype=torch.float64))
    graph = Graph.from_model(model)
    data = random_task(n=3, seq=6, seed=5)
    kind = {NodeKind.Q: "q_input", NodeKind.K: "k_input", NodeKind.V: "v_input"}

    def tl_nodes(sender: str, receiver: str, seq: int) -> list[tuple]:
        s = graph.sender_nodes[graph.sender_index[sender]]
        r = graph.receiver_nodes[graph.receiver_index[receiver]]
        pairs = []
        for p in range(seq):
            if s.kind is NodeKind.INPUT:
                w = tl.Node("embed", p)
            elif s.kind is NodeKind.HEAD:
                w = tl.Node("attn_head_out", p, s.layer, s.head)
            else:
                w = tl.Node("mlp_out", p, s.layer)
            if r.kind is NodeKind.LOGITS:
                rd = tl.Node("logits", p, graph.spec.n_layers - 1)
            elif r.kind is NodeKind.MLP:
                rd = tl.Node("mlp_in", p, r.layer)
            else:
                rd = tl.Node(kind[r.kind], p, r.layer, r.head)
            pairs.append((w, rd))
        return pairs

    for i in range(len(data)):
        pair = data[i : i + 1].trimmed()
        seq = pair.clean.shape[1]
        circuit = random_circuit(graph, 0.5, seed=10 + i)
        kept = [e for s, r in circuit.edges for e in tl_nodes(s, r, seq)]

        def metric_fn(logits: torch.Tensor, pair=pair) -> torch.Tensor:
            return pair.metric_values(logits)[0]

        oracle = tl.faithfulness(model, pair.clean, pair.corrupt, metric_fn, kept)
        ours = ctlens.faithfulness(model, pair, circuit, "corrupt")
        ablated = oracle.corrupt_metric + oracle.recovered * (
            oracle.full_metric - oracle.corrupt_metric
        )
        assert ours.metric_circuit == pytest.approx(ablated, abs=1e-6)
        assert ours.metric_empty == pytest.approx(oracle.corrupt_metric, abs=1e-6)
        assert ours.faithfulness == pytest.approx(oracle.recovered, abs=1e-5)


def test_faithfulness_curve_mib_grid_and_areas(tiny_model, task) -> None:
    graph = Graph.from_model(tiny_model)
    gen = torch.Generator().manual_seed(0)
    scores = EdgeScores(torch.randn(graph.n_senders, graph.n_receivers, generator=gen), graph)
    curve = ctlens.faithfulness_curve(tiny_model, task, scores, batch_size=None)
    assert curve.fractions == MIB_FRACTIONS
    # the one rounding rule of circuit sizes (issue 24; it floored before)
    assert curve.n_edges == tuple(max(1, round(f * graph.n_edges)) for f in MIB_FRACTIONS)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-9)
    single = ctlens.faithfulness(
        tiny_model,
        task,
        Circuit.from_scores(scores, "top_n", top_n=curve.n_edges[6]),
        batch_size=None,
    )
    assert curve.faithfulness[6] == pytest.approx(single.faithfulness, abs=1e-9)
    # trapezoids over the edge fraction, as MIB computes them
    x, f = MIB_FRACTIONS, curve.faithfulness
    cpr = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(x) - 1))
    assert curve.cpr == pytest.approx(cpr) and curve.cmd >= 0
    assert curve_areas((0.0, 1.0), (1.0, 1.0)) == (1.0, 0.0)
    assert curve_areas((0.0, 0.5, 1.0), (0.0, 1.0, 0.0)) == (0.5, 0.5)
    with pytest.raises(ValueError, match="increasing"):
        ctlens.faithfulness_curve(tiny_model, task, scores, sizes=(0.5, 0.1))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ctlens.faithfulness_curve(tiny_model, task, scores, sizes=(0.0, 0.1))
    other = EdgeScores(torch.zeros(16, 28), Graph(ctlens.GraphSpec(3, 4, 2)))
    with pytest.raises(ValueError, match="this model"):
        ctlens.faithfulness_curve(tiny_model, task, other)


def test_faithfulness_says_why_when_full_and_empty_agree(tiny_model, task) -> None:
    """corrupt == clean: M_full == M_empty, so the ratio would be 0 / 0."""
    graph = Graph.from_model(tiny_model)
    same = ctlens.TaskData(
        clean=task.clean,
        corrupt=task.clean,
        correct=task.correct,
        wrong=task.wrong,
        attention_mask=task.attention_mask,
    )
    scores = EdgeScores(torch.ones(graph.n_senders, graph.n_receivers), graph)
    why = r"faithfulness is undefined on this data.*same metric.*does not separate"
    with pytest.raises(ValueError, match=why):
        ctlens.faithfulness(tiny_model, same, random_circuit(graph))
    with pytest.raises(ValueError, match=why):
        ctlens.faithfulness_curve(tiny_model, same, scores, sizes=(0.5, 1.0))


# ------------------------------------------------------------------ restrict_gradients


def train(model, circuit: Circuit, steps: int, **kwargs) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    with ctlens.restrict_gradients(model, circuit, optimizer=opt, **kwargs):
        for _ in range(steps):
            tokens = torch.randint(1, VOCAB, (4, 6), generator=gen)
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_restrict_gradients_frozen_slices_bit_identical(tiny_model) -> None:
    graph = Graph.from_model(tiny_model)
    circuit = random_circuit(graph, 0.05, seed=7)
    rules = {r.name: r.trainable for r in parameter_rules(tiny_model, circuit)}
    before = snapshot(tiny_model)
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    train(tiny_model, circuit, 50)
    after = snapshot(tiny_model)
    moved = 0
    for name, keep in rules.items():
        assert torch.equal(after[name][~keep], before[name][~keep]), name
        if keep.any():
            changed = after[name][keep] != before[name][keep]
            assert bool(changed.all()), f"{name}: a circuit slice did not move"
            moved += int(keep.sum())
    assert 0 < moved < sum(p.numel() for p in before.values())
    assert flags == {n: p.requires_grad for n, p in tiny_model.named_parameters()}


def test_receiver_only_head_moves_only_its_slice(tiny_model) -> None:
    graph = Graph.from_model(tiny_model)
    d_head = tiny_model.cfg.d_head
    kv = "g1" if graph.spec.grouped else "h1"
    for receiver, component in ((f"a1.{kv}.k", "k"), ("a1.h2.q", "q"), (f"a1.{kv}.v", "v")):
        before = snapshot(tiny_model)
        train(tiny_model, Circuit.from_edges(graph, [("input", receiver)]), 3)
        after = snapshot(tiny_model)
        module = getattr(tiny_model.blocks[1].attn, component).original_component
        weight = module.weight
        index = 2 if component == "q" else 1
        rows = slice(index * d_head, (index + 1) * d_head)
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        weight_name = next(n for n, p in tiny_model.named_parameters() if p is weight)
        assert weight_name in changed
        axis = 0 if isinstance(module, torch.nn.Linear) else 1
        diff = after[weight_name] != before[weight_name]
        inside = diff[rows] if axis == 0 else diff[:, rows]
        assert bool(inside.all())
        assert int(diff.sum()) == inside.numel()
        allowed = {weight_name}
        if module.bias is not None:
            allowed.add(next(n for n, p in tiny_model.named_parameters() if p is module.bias))
        # GPT-2's fused qkv parameter shares storage with the q/k/v views
        assert set(changed) - allowed <= {n for n in changed if "qkv" in n}


def test_parameter_map_covers_what_receives_gradients(tiny_model, task, family) -> None:
    graph = Graph.from_model(tiny_model)
    full = parameter_rules(tiny_model, Circuit.full(graph), True, True)
    tiny_model.zero_grad(set_to_none=True)
    tiny_model(task.clean).sum().backward()
    with_grad = {id(p) for p in tiny_model.parameters() if p.grad is not None}
    assert with_grad == {id(r.parameter) for r in full}
    norms = [r for r in full if "ln" in r.name or "norm" in r.name]
    assert norms and not any(r.trainable.any() for r in norms)
    assert all(r.trainable.all() for r in full if r not in norms)
    tiny_model.zero_grad(set_to_none=True)
    real = sum(r.parameter.numel() for r in full)
    build = tiny_gpt2_module if family == "gpt2" else tiny_llama_module
    assert real == sum(p.numel() for p in build().parameters())  # a fresh, unwrapped module
    none = parameter_rules(tiny_model, Circuit.full(graph))
    embed = tiny_model.embed.original_component.weight
    assert not next(r for r in none if r.parameter is embed).trainable.any()


def test_parameter_rules_come_from_the_per_kind_tables(tiny_model, monkeypatch) -> None:
    """One edge m0 -> logits opens exactly MLP 0's output projection (the logits receiver
    opens nothing without train_unembedding); a head sender opens its W_O inputs and b_O;
    a kind with no table entry is refused with a message naming the node."""
    from ctlens.masking import rules as table

    graph = Graph.from_model(tiny_model)
    d_head = tiny_model.cfg.d_head

    def opened(edges) -> dict[str, torch.Tensor]:
        found = parameter_rules(tiny_model, Circuit.from_edges(graph, edges))
        return {r.name: r.trainable for r in found if r.trainable.any()}

    out = tiny_model.blocks[0].mlp.out.original_component
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    expected = {names[id(out.weight)]} | ({names[id(out.bias)]} if out.bias is not None else set())
    mlp = opened([("m0", "logits")])
    assert set(mlp) == expected and all(bool(m.all()) for m in mlp.values())
    o = tiny_model.blocks[0].attn.o.original_component
    head = opened([("a0.h1", "logits")])
    weight = head.pop(names[id(o.weight)])
    inputs = slice(d_head, 2 * d_head)
    assert bool(weight[:, inputs].all() if isinstance(o, torch.nn.Linear) else weight[inputs].all())
    assert int(weight.sum()) == weight.numel() // tiny_model.cfg.n_heads
    assert set(head) == ({names[id(o.bias)]} if o.bias is not None else set())
    monkeypatch.delitem(table.SENDER_RULES, NodeKind.MLP)
    with pytest.raises(ValueError, match="no parameter rule for sender 'm0'"):
        parameter_rules(tiny_model, Circuit.from_edges(graph, [("m0", "logits")]))


def test_restrict_gradients_restores_on_error_and_checks_inputs(tiny_model) -> None:
    graph = Graph.from_model(tiny_model)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    flags = [p.requires_grad for p in tiny_model.parameters()]
    with (
        pytest.raises(RuntimeError, match="boom"),
        ctlens.restrict_gradients(tiny_model, Circuit.empty(graph), optimizer=opt) as r,
    ):
        assert not any(rule.parameter.requires_grad for rule in r.rules)
        assert r.n_trainable == 0 and r.n_total > 0
        raise RuntimeError("boom")
    assert flags == [p.requires_grad for p in tiny_model.parameters()]
    assert not opt._optimizer_step_post_hooks
    assert all(not p._backward_hooks for p in tiny_model.parameters())
    with (
        pytest.raises(ValueError, match="another model's graph"),
        ctlens.restrict_gradients(tiny_model, Circuit.empty(Graph(ctlens.GraphSpec(4, 4, 4)))),
    ):
        pass
    with (
        pytest.raises(TypeError, match="Optimizer"),
        ctlens.restrict_gradients(tiny_model, Circuit.empty(graph), optimizer="adam"),
    ):  # type: ignore[arg-type]
        pass


def test_restrict_gradients_set_circuit_in_place(tiny_model) -> None:
    graph = Graph.from_model(tiny_model)
    first, second = random_circuit(graph, 0.05, seed=8), random_circuit(graph, 0.05, seed=9)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        logits = tiny_model(torch.randint(1, VOCAB, (2, 5), generator=gen))
        opt.zero_grad()
        logits.pow(2).mean().backward()
        opt.step()

    with ctlens.restrict_gradients(tiny_model, first, optimizer=opt) as restriction:
        for _ in range(3):
            step()
        restriction.set_circuit(second)
        keep = {r.name: r.trainable for r in restriction.rules}
        before = snapshot(tiny_model)
        for _ in range(3):
            step()
    after = snapshot(tiny_model)
    for name, mask in keep.items():
        assert torch.equal(after[name][~mask], before[name][~mask]), name
    assert any(not torch.equal(after[n], before[n]) for n in keep)
    assert len(opt._optimizer_step_post_hooks) == 0
