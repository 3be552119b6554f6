"""MLP neuron groups ("MLP heads"): graph, attribution, coarsening, against oracles.

Two oracles: (1) the one-group graph (coarsened eap / eap-ig group scores must equal its
scores, for sender and receiver groups); (2) an independent patcher on the plain HF module
that perturbs only one group's neurons (so scores split evenly over groups cannot pass):
its finite-difference derivative is the EAP score of a single group edge, its full patch the
exact score.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import random_task, tiny_gpt2_module, tiny_llama_module, tiny_neox_module
from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM

import ctlens
from ctlens.data import TaskData
from ctlens.graph import Graph, GraphSpec
from ctlens.types import NodeKind

BUILDERS = {"gpt2": tiny_gpt2_module, "llama": tiny_llama_module, "neox": tiny_neox_module}
GROUPS = 4


@pytest.fixture(autouse=True)
def float64_rmsnorm(monkeypatch):
    """HF's LlamaRMSNorm rounds through float32; finite differences need float64 throughout."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm.forward

    def forward(self, x):
        if x.dtype != torch.float64:
            return original(self, x)
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (x * scale)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def with_biases(module: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Give every bias a random value (HF initialises them to zero, hiding b_out effects)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def pair(family: str) -> tuple[object, torch.nn.Module]:
    """``(bridge, plain HF module)`` over two identical copies of one random float64 model."""
    module = with_biases(BUILDERS[family](dtype=torch.float64))
    return ctlens.load_model(copy.deepcopy(module)), module


# ------------------------------------------------------------------------------ the graph


def test_one_group_graph_is_todays_graph():
    spec = GraphSpec(2, 4, 2)
    assert GraphSpec(2, 4, 2, mlp_groups=1) == spec
    assert "mlp_groups" not in spec.to_dict()
    graph = Graph(spec)
    assert graph.senders[5] == "m0" and graph.mlp_sender(1) == 10
    assert graph.mlp_senders(0) == slice(5, 6)


def test_grouped_graph_names_counts_and_validity():
    graph = Graph(GraphSpec(12, 12, 12, mlp_groups=48))
    assert (graph.n_senders, graph.n_receivers, graph.n_edges) == (721, 1009, 341_281)
    small = Graph(GraphSpec(2, 4, 2, mlp_groups=3))
    assert small.senders[5:8] == ["m0.n0", "m0.n1", "m0.n2"]
    assert [small.receivers[i] for i in range(8, 11)] == ["m0.n0", "m0.n1", "m0.n2"]
    assert small.mlp_senders(1) == slice(12, 15)
    # groups of one MLP do not feed each other; every earlier group feeds every later one
    own, next_mlp = (small.receiver_slice(layer, NodeKind.MLP) for layer in (0, 1))
    assert not small.valid[small.mlp_senders(0), own].any()
    assert small.valid[small.mlp_senders(0), next_mlp].all()
    assert GraphSpec.from_dict(small.spec.to_dict()) == small.spec
    with pytest.raises(ValueError, match="mlp_senders"):
        small.mlp_sender(0)


def test_parallel_blocks_keep_their_validity_rule():
    graph = Graph(GraphSpec(2, 4, 4, parallel_attn_mlp=True, mlp_groups=2))
    heads = graph.sender_slice(0)
    mlp_in = graph.receiver_slice(0, NodeKind.MLP)
    assert not graph.valid[heads, mlp_in].any()
    assert graph.valid[graph.sender_index["input"], mlp_in].all()


@pytest.mark.parametrize("bad", [0, -2, 5, 2.0, True])
def test_bad_mlp_groups_are_refused(bad):
    model = ctlens.load_model(tiny_gpt2_module())
    with pytest.raises(ValueError, match="mlp_groups") as err:
        Graph.from_model(model, mlp_groups=bad)
    if bad == 5:
        assert "128" in str(err.value) and "64" in str(err.value)


def test_unknown_group_name_is_a_clear_error():
    graph = Graph(GraphSpec(2, 4, 4, mlp_groups=4))
    with pytest.raises(KeyError, match=r"m1\.n99.*m\{l\}\.n0 \.\. m\{l\}\.n3"):
        graph.edge_index("m1.n99", "logits")
    with pytest.raises(KeyError, match="one per MLP"):
        Graph(GraphSpec(2, 4, 4)).edge_index("a0.h0", "m1.n0")


def test_attribute_refuses_a_graph_of_another_model():
    model = ctlens.load_model(tiny_gpt2_module())
    with pytest.raises(ValueError, match="does not belong"):
        ctlens.attribute(
            model, random_task(), graph=Graph(GraphSpec(3, 4, 4, mlp_groups=2)), progress=False
        )


# ------------------------------------------------------------------------------ coarsening


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize(
    ("method", "ablation"),
    [("eap", "corrupt"), ("eap", "mean"), ("eap-ig", "corrupt"), ("eap-ig", "mean")],
)
def test_coarsened_group_scores_equal_one_group_scores(family, method, ablation):
    model, _ = pair(family)
    task = random_task()
    one = ctlens.attribute(model, task, method=method, ablation=ablation, progress=False)
    graph = Graph.from_model(model, mlp_groups=GROUPS)
    grouped = ctlens.attribute(
        model, task, method=method, ablation=ablation, progress=False, graph=graph
    )
    coarse = grouped.coarsen()
    assert coarse.graph == one.graph
    torch.testing.assert_close(coarse.scores, one.scores, rtol=1e-5, atol=1e-7)
    # the groups really differ (a split into equal shares would also sum correctly)
    rows = grouped.scores[graph.mlp_senders(0)]
    assert (rows - rows.mean(0)).abs().max() > 1e-4


def test_zero_ablation_differs_by_the_output_bias():
    """One-group zero ablation also removes b_out; group senders leave it in place."""
    model, _ = pair("gpt2")
    task = random_task()
    one = ctlens.attribute(model, task, ablation="zero", progress=False)
    graph = Graph.from_model(model, mlp_groups=GROUPS)
    coarse = ctlens.attribute(model, task, ablation="zero", progress=False, graph=graph).coarsen()
    mlp_rows = [one.graph.mlp_sender(layer) for layer in range(2)]
    others = [i for i in range(one.graph.n_senders) if i not in mlp_rows]
    torch.testing.assert_close(coarse.scores[others], one.scores[others], rtol=1e-5, atol=1e-7)
    assert (coarse.scores[mlp_rows] - one.scores[mlp_rows]).abs().max() > 1e-4


# ------------------------------------------------------------------------------ single groups


class GroupPatcher:
    """Perturb one MLP group's input or add one group's output, on a plain HF module."""

    def __init__(self, module: torch.nn.Module, groups: int) -> None:
        self.m = module.eval()
        if isinstance(module, GPT2LMHeadModel):
            self.blocks = list(module.transformer.h)
            self.final_norm = module.transformer.ln_f
            self.norm = lambda b: b.ln_2
            self.ins = lambda b: [b.mlp.c_fc]
            self.out = lambda b: b.mlp.c_proj
        elif isinstance(module, GPTNeoXForCausalLM):
            self.blocks = list(module.gpt_neox.layers)
            self.final_norm = module.gpt_neox.final_layer_norm
            self.norm = lambda b: b.post_attention_layernorm
            self.ins = lambda b: [b.mlp.dense_h_to_4h]
            self.out = lambda b: b.mlp.dense_4h_to_h
        else:
            self.blocks = list(module.model.layers)
            self.final_norm = module.model.norm
            self.norm = lambda b: b.post_attention_layernorm
            self.ins = lambda b: [b.mlp.gate_proj, b.mlp.up_proj]
            self.out = lambda b: b.mlp.down_proj
        self.groups = groups

    def cols(self, group: int, d_mlp: int) -> slice:
        width = d_mlp // self.groups
        return slice(group * width, (group + 1) * width)

    def run(
        self,
        tokens: torch.Tensor,
        receiver: tuple[int, int, torch.Tensor] | None = None,
        final_shift: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """Logits, hidden states and every MLP's post-activation, with optional patches.

        ``receiver=(layer, group, e)`` adds ``e`` to that group's copy of the MLP input only;
        ``final_shift`` is added to the final norm's input.
        """
        handles, posts, resid = [], [], {}
        for layer, block in enumerate(self.blocks):
            handles.append(
                self.out(block).register_forward_pre_hook(lambda m, a: posts.append(a[0]))
            )
            if receiver is None or receiver[0] != layer:
                continue
            _, group, e = receiver
            norm = self.norm(block)
            handles.append(norm.register_forward_pre_hook(lambda m, a: resid.update(x=a[0])))
            for proj in self.ins(block):

                def patch(mod, args, out, norm=norm, group=group, e=e):
                    out = out.clone()
                    cols = self.cols(group, out.shape[-1])
                    out[..., cols] = mod.forward(norm.forward(resid["x"] + e))[..., cols]
                    return out

                handles.append(proj.register_forward_hook(patch))
        if final_shift is not None:
            handles.append(
                self.final_norm.register_forward_pre_hook(lambda m, a: (a[0] + final_shift,))
            )
        try:
            out = self.m(tokens, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        return out.logits, out.hidden_states, posts

    def group_output(self, post: torch.Tensor, layer: int, group: int) -> torch.Tensor:
        proj = self.out(self.blocks[layer])
        weight = proj.weight if type(proj).__name__ == "Conv1D" else proj.weight.T
        cols = self.cols(group, post.shape[-1])
        return post[..., cols] @ weight[cols]


def metric(data: TaskData, logits: torch.Tensor) -> float:
    rows = torch.arange(len(data))
    at = logits[rows, data.positions]
    return float((at[rows, data.correct] - at[rows, data.wrong]).mean())


def group_edge_effects(module, data, edge, eps):
    """``(d/de M at e=0 by central differences, M(e=1) - M(0))`` for one group edge."""
    patcher = GroupPatcher(module, GROUPS)
    with torch.no_grad():
        _, clean_h, clean_post = patcher.run(data.clean)
        _, ref_h, ref_post = patcher.run(data.corrupt)
        sender, receiver = edge
        if sender == "input":
            delta = ref_h[0] - clean_h[0]
        else:
            layer, group = (int(x) for x in sender[1:].split(".n"))
            delta = patcher.group_output(ref_post[layer] - clean_post[layer], layer, group)

        def at(scale: float) -> float:
            e = scale * delta
            if receiver == "logits":
                return metric(data, patcher.run(data.clean, final_shift=e)[0])
            layer, group = (int(x) for x in receiver[1:].split(".n"))
            return metric(data, patcher.run(data.clean, receiver=(layer, group, e))[0])

        return (at(eps) - at(-eps)) / (2 * eps), at(1.0) - at(0.0)


EDGES = [("input", "m1.n2"), ("m0.n1", "logits"), ("m0.n3", "m1.n0")]


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_single_group_edges_match_independent_patching(family):
    model, module = pair(family)
    task = random_task(n=4)
    graph = Graph.from_model(model, mlp_groups=GROUPS)
    eap = ctlens.attribute(model, task, progress=False, graph=graph)
    exact = ctlens.attribute(model, task, method="exact", progress=False, graph=graph)
    for edge in EDGES:
        derivative, effect = group_edge_effects(module, task, edge, eps=1e-4)
        i, j = graph.edge_index(*edge)
        assert abs(derivative) > 1e-6
        assert eap.scores[i, j].item() == pytest.approx(derivative, rel=1e-4, abs=1e-9)
        # exact patches a float32 copy of a^ref - a^clean: agreement to ~1e-8 absolute
        assert exact.scores[i, j].item() == pytest.approx(effect, rel=1e-3, abs=1e-8)


def test_exact_coarsening_is_a_sum_of_group_effects():
    """Exact group scores sum to the coarse shape but not to the one-group exact scores."""
    model, _ = pair("gpt2")
    task = random_task(n=4)
    one = ctlens.attribute(model, task, method="exact", progress=False)
    graph = Graph.from_model(model, mlp_groups=2)
    grouped = ctlens.attribute(model, task, method="exact", progress=False, graph=graph)
    coarse = grouped.coarsen()
    # an edge with no group at either end is patched the same way
    i, j = one.graph.edge_index("a0.h0", "logits")
    assert coarse.scores[i, j].item() == pytest.approx(one.scores[i, j].item(), rel=1e-5)
    i, j = one.graph.edge_index("m0", "m1")
    assert coarse.scores[i, j].item() != pytest.approx(one.scores[i, j].item(), rel=1e-3)


# ------------------------------------------------------------------------------ circuits


def grouped_scores(groups: int = GROUPS) -> ctlens.EdgeScores:
    model = ctlens.load_model(tiny_gpt2_module())
    graph = Graph.from_model(model, mlp_groups=groups)
    return ctlens.attribute(model, random_task(), progress=False, graph=graph)


def test_circuit_coarsen_keeps_an_mlp_when_any_group_is_in():
    scores = grouped_scores()
    graph = scores.graph
    circuit = ctlens.Circuit.from_edges(
        graph, [("m0.n2", "logits"), ("m0.n1", "m1.n3"), ("a0.h1", "m1.n0")], scores.scores
    )
    coarse = circuit.coarsen()
    assert coarse.graph == Graph(GraphSpec(2, 4, 4))
    assert sorted(coarse.edges) == [("a0.h1", "m1"), ("m0", "logits"), ("m0", "m1")]
    torch.testing.assert_close(coarse.scores, scores.coarsen().scores)


def test_grouped_circuit_files_round_trip_and_check_the_grouping(tmp_path):
    scores = grouped_scores()
    circuit = ctlens.Circuit.from_scores(scores, top_n=40)
    path = circuit.save(tmp_path / "c.json")
    assert json.loads(path.read_text())["graph"]["mlp_groups"] == 4
    model = ctlens.load_model(tiny_gpt2_module())
    loaded = ctlens.Circuit.load(path, model=model)
    assert loaded == circuit and loaded.graph.spec.mlp_groups == 4
    # one-group files stay as they were: no mlp_groups key at all
    plain = ctlens.Circuit.from_scores(scores.coarsen(), top_n=10).save(tmp_path / "p.json")
    assert "mlp_groups" not in json.loads(plain.read_text())["graph"]
    # a model whose MLP width the grouping does not divide: a clear error
    odd = ctlens.load_model(tiny_gpt2_module())
    odd.cfg.d_mlp = 130
    with pytest.raises(ValueError, match="4 neuron groups.*130"):
        loaded.check_model(odd)


def test_grouped_circuit_refuses_names_of_another_grouping():
    graph = Graph(GraphSpec(2, 4, 4, mlp_groups=4))
    with pytest.raises(KeyError, match="m1.n7"):
        ctlens.Circuit.from_edges(graph, [("m1.n7", "logits")])
    with pytest.raises(KeyError, match="m0"):
        ctlens.Circuit.from_edges(graph, [("m0", "logits")])


def test_selection_and_pruning_on_grouped_graphs():
    scores = grouped_scores()
    graph = scores.graph
    greedy = ctlens.Circuit.from_scores(scores, method="greedy", top_n=30)
    assert greedy.n_edges == 30
    # greedy grows from logits: a receiver is opened only once its own component (a head,
    # or that very MLP group, not its siblings) has joined as a sender
    senders = {s for s, _ in greedy.edges}
    for _, receiver in greedy.edges:
        owner = receiver if receiver.startswith("m") else receiver.rsplit(".", 1)[0]
        assert receiver == "logits" or owner in senders, receiver
    pruned = ctlens.Circuit.from_scores(scores, top_n=60, prune=True)
    assert ctlens.Circuit.from_networkx(pruned.to_networkx()) == pruned
    assert torch.equal(ctlens.circuit.prune_mask(graph, pruned.mask), pruned.mask)
    # a group's own input leads only to that group
    circuit = ctlens.Circuit.from_edges(graph, [("input", "m0.n1"), ("m0.n2", "logits")])
    assert ctlens.circuit.prune_mask(graph, circuit.mask).sum() == 0


def test_top_n_takes_a_fraction_of_the_valid_edges():
    scores = grouped_scores()
    n = scores.graph.n_edges
    circuit = ctlens.Circuit.from_scores(scores, top_n=0.1)
    assert circuit.n_edges == round(0.1 * n)
    for bad in (0.0, 1.0, 1.5, -3, float("nan")):
        with pytest.raises(ValueError, match="top_n"):
            ctlens.Circuit.from_scores(scores, top_n=bad)


def test_mib_export_refuses_groups_and_accepts_the_coarse_circuit(tmp_path):
    circuit = ctlens.Circuit.from_scores(grouped_scores(), top_n=20)
    with pytest.raises(ValueError, match=r"coarsen\(\)"):
        circuit.to_mib_json(tmp_path / "mib.json")
    assert not (tmp_path / "mib.json").exists()
    path = circuit.coarsen().to_mib_json(tmp_path / "mib.json")
    assert ctlens.Circuit.from_mib_json(path).n_edges == circuit.coarsen().n_edges


# ------------------------------------------------------------------------------ masking


def refined(coarse: ctlens.Circuit, graph: Graph) -> ctlens.Circuit:
    """Every group edge whose one-group edge is in ``coarse``."""
    from ctlens.graph import coarse_indices

    rows, cols = coarse_indices(graph)
    return ctlens.Circuit(graph, coarse.mask[rows][:, cols] & graph.valid)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_a_circuit_of_whole_mlps_masks_the_same_on_both_graphs(family, ablation):
    model, _ = pair(family)
    task = random_task()
    one = ctlens.attribute(model, task, ablation=ablation, progress=False)
    coarse = ctlens.Circuit.from_scores(one, top_n=25)
    grouped = refined(coarse, Graph.from_model(model, mlp_groups=GROUPS))
    assert grouped.coarsen() == coarse
    a = ctlens.faithfulness(model, task, coarse, ablation=ablation)
    b = ctlens.faithfulness(model, task, grouped, ablation=ablation)
    # mean_activations accumulates in float32, so group means sum to the MLP mean to ~1e-7
    rel = 1e-9 if ablation == "corrupt" else 1e-5
    assert b.metric_circuit == pytest.approx(a.metric_circuit, rel=rel, abs=1e-12)
    assert b.metric_empty == pytest.approx(a.metric_empty, rel=rel, abs=1e-12)
    assert b.n_total_edges == grouped.graph.n_edges


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ablating_one_group_edge_equals_independent_patching(family):
    model, module = pair(family)
    task = random_task(n=4)
    graph = Graph.from_model(model, mlp_groups=GROUPS)
    for edge in EDGES:
        circuit = ctlens.Circuit(graph, graph.valid.clone())
        circuit.mask[graph.edge_index(*edge)] = False
        # (faithfulness reports float32 metrics; edge_mask plus a float64 metric is exact)
        with torch.no_grad():
            base = metric(task, model(task.clean))
            with ctlens.edge_mask(model, circuit, ablation="corrupt", reference=task.corrupt):
                masked = metric(task, model(task.clean))
        _, effect = group_edge_effects(module, task, edge, eps=1e-4)
        assert abs(effect) > 1e-7
        assert masked - base == pytest.approx(effect, rel=1e-6)


def slow_grouped_forward(model, circuit, tokens, reference):
    """A masked forward rebuilt one receiver column and one sender at a time, every group of
    every MLP with an input of its own: ``x_r' = (x_r - sum_s a_s) + sum_{s in circuit} a_s
    + sum_{s not in circuit} reference[s]`` (``reference``: ``[n_senders, b or 1, p, d]``)."""
    from ctlens.bridge.hooks import receiver_hooks, sender_hooks
    from ctlens.bridge.mlp_groups import GroupedInput

    graph = circuit.graph
    live: dict[int, torch.Tensor] = {}

    def grab(rows: slice, act: torch.Tensor) -> None:
        act = act[:, :, None] if act.ndim == 3 else act
        for offset, i in enumerate(range(rows.start, rows.stop)):
            live[i] = live[i] + act[:, :, offset] if i == 0 and i in live else act[:, :, offset]

    def rebuilt(j: int, x: torch.Tensor) -> torch.Tensor:
        upstream = range(graph.upstream[j])
        new = x - sum(live[i] for i in upstream)  # the constant biases
        for i in upstream:
            new = new + (live[i] if circuit.mask[i, j] else reference[i].to(x.dtype))
        return new

    def rebuild(columns: slice, n_up: int, x: torch.Tensor):
        inputs = [rebuilt(j, x if x.ndim == 3 else x[:, :, k])
                  for k, j in enumerate(range(columns.start, columns.stop))]
        if x.ndim == 4:
            return torch.stack(inputs, 2)
        if len(inputs) == 1:
            return inputs[0]
        return GroupedInput(x, torch.arange(len(inputs)), torch.stack(inputs, 2))

    live.clear()
    hooks = sender_hooks(model, graph, grab) + receiver_hooks(model, graph, rebuild)
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
@pytest.mark.parametrize("fraction", [0.05, 0.9])
def test_grouped_edge_mask_matches_slow_rebuild_values_and_gradients(family, ablation, fraction):
    """On a grouped graph edge_mask computes only the group outputs its hooks read and gives
    own inputs only to groups with an edge of their own; a rebuild that gives every group
    its own input gets the same logits and the same parameter gradients."""
    from ctlens.bridge.hooks import sender_hooks

    model, _ = pair(family)
    task = random_task(n=4)
    graph = Graph.from_model(model, mlp_groups=GROUPS)
    gen = torch.Generator().manual_seed(7)
    circuit = ctlens.Circuit(graph, (torch.rand(graph.valid.shape, generator=gen) < fraction)
                             & graph.valid)
    if ablation == "mean":
        means = ctlens.mean_activations(model, task, graph=graph)
        reference, masked_ref = means[:, None].double(), means
    else:
        reference = torch.zeros(graph.n_senders, *task.clean.shape, model.cfg.d_model,
                                dtype=torch.float64)

        def record(rows, act):
            reference[rows] += (act[:, :, None] if act.ndim == 3 else act).permute(2, 0, 1, 3)

        with torch.no_grad():
            model.run_with_hooks(task.corrupt, fwd_hooks=sender_hooks(model, graph, record))
        masked_ref = task.corrupt

    def grads(fn):
        model.zero_grad(set_to_none=True)
        logits = fn()
        task.metric_values(logits).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    slow_logits, slow_grads = grads(
        lambda: slow_grouped_forward(model, circuit, task.clean, reference))
    with ctlens.edge_mask(model, circuit, ablation, reference=masked_ref) as mask:
        fast_logits, fast_grads = grads(lambda: model(task.clean))
        plans = mask._plan.groups.values()
        kinds = {g.kind for g in plans}
        special = [len(g.special) for g in plans if g.special is not None]
    model.zero_grad(set_to_none=True)
    assert ("kept" if fraction < 0.5 else "excluded") in kinds
    assert special and min(special) < GROUPS  # some groups read the common input
    tol = {"rtol": 1e-9, "atol": 1e-10} if family == "gpt2" else {"rtol": 2e-6, "atol": 2e-6}
    torch.testing.assert_close(fast_logits, slow_logits, **tol)
    assert not torch.allclose(fast_logits, model(task.clean).detach())
    assert len(fast_grads) == len(slow_grads) > 0
    for fast, slow in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(fast, slow, **tol)


def adamw_steps(model, circuit, steps: int = 4) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    with ctlens.restrict_gradients(model, circuit, optimizer=opt):
        for _ in range(steps):
            tokens = torch.randint(1, 50, (3, 6), generator=gen)
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()


def named(model, tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is tensor)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_group_nodes_move_only_their_neurons(family):
    model, _ = pair(family)
    graph = Graph.from_model(model, mlp_groups=GROUPS)
    mlp = model.blocks[1].mlp if family == "llama" else model.blocks[0].mlp
    edge = ("input", "m1.n2") if family == "llama" else ("m0.n1", "logits")
    circuit = ctlens.Circuit.from_edges(graph, [edge])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adamw_steps(model, circuit)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    if family == "llama":  # receiver group 2: its rows of gate_proj and up_proj, nothing else
        width = 64 // GROUPS
        rows = slice(2 * width, 3 * width)
        weights = [getattr(mlp, k).original_component.weight for k in ("gate", "in")]
        assert changed == {named(model, w) for w in weights}
        for w in weights:
            diff = w.detach() != before[named(model, w)]
            assert diff[rows].all() and int(diff.sum()) == diff[rows].numel()
    else:  # sender group 1: its rows of c_proj (Conv1D [d_mlp, d]) and b_out
        width = 128 // GROUPS
        out = mlp.out.original_component
        assert changed == {named(model, out.weight), named(model, out.bias)}
        diff = out.weight.detach() != before[named(model, out.weight)]
        assert diff[width : 2 * width].all() and int(diff.sum()) == diff[width : 2 * width].numel()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grouped_circuit_frozen_slices_bit_identical_under_adamw(family):
    model, _ = pair(family)
    graph = Graph.from_model(model, mlp_groups=GROUPS)
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(graph.valid.shape, generator=gen) < 0.03) & graph.valid
    circuit = ctlens.Circuit(graph, mask)
    rules = {r.name: r.trainable for r in ctlens.masking.parameter_rules(model, circuit)}
    one_group = {
        r.name: r.trainable for r in ctlens.masking.parameter_rules(model, circuit.coarsen())
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adamw_steps(model, circuit, steps=20)
    trainable = 0
    for name, keep in rules.items():
        after = dict(model.named_parameters())[name].detach()
        assert torch.equal(after[~keep], before[name][~keep]), name
        assert bool((after[keep] != before[name][keep]).all()), name
        assert not (keep & ~one_group[name]).any(), name  # never more than the whole MLPs
        trainable += int(keep.sum())
    assert trainable < sum(int(k.sum()) for k in one_group.values())


# ------------------------------------------------------------------------------ command line


def test_discover_command_takes_mlp_groups_and_a_fraction(tmp_path, capsys):
    from ctlens.cli import main

    out = tmp_path / "c.json"
    argv = ["discover", "--model", "zoo:tiny-gpt2", "--n", "4", "--top", "3"]
    assert main([*argv, "--mlp-groups", "8", "--top-n", "0.01", "--out", str(out)]) == 0
    circuit = ctlens.Circuit.load(out)
    assert circuit.graph.spec.mlp_groups == 8
    assert circuit.n_edges == round(0.01 * circuit.graph.n_edges)
    assert main([*argv, "--mlp-groups", "7"]) == 2
    assert "choose a divisor" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--top-n", "1.5"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------ tuning, viz


def test_tune_config_sizes_and_groups():
    cfg = ctlens.TuneConfig(top_n=0.1, top_n_start=0.5, top_n_schedule="linear", steps=3)
    assert [cfg.top_n_at(t, 1000) for t in range(3)] == [500, 300, 100]
    with pytest.raises(ValueError, match="fraction"):
        cfg.top_n_at(0)
    assert ctlens.TuneConfig(mlp_group_size=32).groups_for(128) == 4
    with pytest.raises(ValueError, match="divide"):
        ctlens.TuneConfig(mlp_group_size=48).groups_for(128)
    with pytest.raises(ValueError, match="not both"):
        ctlens.TuneConfig(mlp_groups=2, mlp_group_size=32)
    for bad in ({"top_n": 1.5}, {"top_n": 0}, {"mlp_groups": 0}):
        with pytest.raises(ValueError):
            ctlens.TuneConfig(**bad)


def test_grouped_circuit_tuning_moves_fewer_parameters(tmp_path):
    from tuning_toy import toy_task

    task = toy_task()
    moved = {}
    for groups in (1, 4):
        model = ctlens.load_model(tiny_gpt2_module())
        cfg = ctlens.TuneConfig(
            steps=2,
            top_n=0.05,
            mlp_groups=groups,
            batch_size=4,
            eval_every=2,
            save_every=2,
            eval_examples=8,
            progress=False,
            export=False,
        )
        result = ctlens.CircuitTuner(model, task, cfg).run(tmp_path / f"g{groups}")
        run = json.loads((tmp_path / f"g{groups}" / "run.json").read_text())
        assert run["config"]["mlp_groups"] == groups
        assert run["graph"].get("mlp_groups", 1) == groups
        moved[groups] = result.metrics["params_moved"]
    assert 0 < moved[4] < moved[1]
    # the report and a diff of two snapshots read the grouped run
    report = ctlens.viz.write_report(tmp_path / "g4", top=50, max_frames=3)
    assert "m0.n" in report.read_text()
    snapshots = sorted((tmp_path / "g4" / "circuits").glob("*.json"))
    diff = ctlens.viz.write_diff(snapshots[0], snapshots[-1], tmp_path / "diff.html")
    assert diff.stat().st_size > 0


def test_viz_draws_grouped_circuits_and_group_scores():
    scores = grouped_scores()
    circuit = ctlens.Circuit.from_scores(scores, top_n=30)
    fig = ctlens.viz.plot_circuit(circuit)
    texts = " ".join(str(t.text) for t in fig.data if t.text is not None)
    assert "m0.n" in texts
    layout = ctlens.viz.layout.Layout(scores.graph)
    xs = {float(layout.sender_x[scores.graph.sender_index[f"m1.n{j}"]]) for j in range(GROUPS)}
    assert len(xs) == GROUPS  # the groups of one MLP do not sit on top of each other
    heat = ctlens.viz.plot_node_scores(scores).data[0]
    assert list(heat.x[-GROUPS:]) == [f"n{j}" for j in range(GROUPS)]
    node = scores.node_scores()
    assert heat.z[1][-1] == pytest.approx(node[f"m1.n{GROUPS - 1}"])
