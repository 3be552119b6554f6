"""The paper's options (issue 12): top_nodes selection, SGD with momentum, sequence loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tuning_toy import tiny_model, toy_task

import ctlens
from ctlens.tuning import TuneConfig
from ctlens.tuning import weights as W
from ctlens.tuning.discovery import top_nodes_rank
from ctlens.tuning.runner import CircuitTuner

FAST = dict(top_n=30, steps=4, batch_size=6, lr=1e-2, eval_every=2, save_every=2,
            eval_examples=6, progress=False, export=False)


def test_top_nodes_ranks_by_both_ends() -> None:
    graph = ctlens.Graph.from_model(tiny_model())
    scores = torch.randn(graph.n_senders, graph.n_receivers) * graph.valid
    rank = top_nodes_rank(scores, graph)
    s, r = torch.nonzero(graph.valid)[5]  # one valid edge, by the definition
    expected = scores[s, r].abs() * scores[s].abs().sum() * scores[:, r].abs().sum()
    torch.testing.assert_close(rank[s, r], expected)
    tuner = CircuitTuner(tiny_model(), toy_task(), TuneConfig(selection="top_nodes", **FAST))
    circuit = tuner.discovery.select(scores, 0)
    order = torch.argsort(rank.flatten(), descending=True, stable=True)[:30]
    assert torch.equal(circuit.mask.flatten().nonzero()[:, 0].sort().values, order.sort().values)
    assert torch.equal(circuit.scores, scores)  # the circuit keeps the real scores
    plain = CircuitTuner(tiny_model(), toy_task(), TuneConfig(**FAST)).discovery.select(scores, 0)
    assert not torch.equal(plain.mask, circuit.mask)


@pytest.mark.parametrize("options", [
    {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1},
    {"loss": "sequence", "weight_decay": 0.1},
    {"optimizer": "sgd", "loss": "sequence", "selection": "top_nodes", "weight_decay": 1e-4},
], ids=["sgd", "sequence", "paper"])
def test_gradient_restriction_is_exact_under_the_papers_options(
    options: dict, tmp_path: Path
) -> None:
    """With one circuit in force (every_k = steps), nothing outside it moves, bit for bit."""
    model = tiny_model()
    before = {k: v.detach().clone() for k, v in W.hf_state_dict(model).items()}
    cfg = TuneConfig(mode="gradient", every_k=4, **{**FAST, **options})
    result = CircuitTuner(model, toy_task(), cfg).run(tmp_path / "r")
    after = W.hf_state_dict(model)
    frozen = [k for k in before if "ln_" in k or "wte" in k or "wpe" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    circuit = ctlens.Circuit.load(result.out_dir / "circuits" / "step_000004.json")
    graph = circuit.graph
    sends, reads = circuit.mask.any(1), circuit.mask.any(0)
    moved = 0
    for layer in range(graph.spec.n_layers):
        key = f"transformer.h.{layer}.mlp.c_proj.weight"
        if not sends[graph.mlp_sender(layer)]:
            assert torch.equal(before[key], after[key]), key
        else:
            moved += int(not torch.equal(before[key], after[key]))
        key = f"transformer.h.{layer}.mlp.c_fc.weight"
        if not reads[graph.receiver_slice(layer, ctlens.types.NodeKind.MLP)].any():
            assert torch.equal(before[key], after[key]), key
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text()
               .splitlines()]
    assert 0 < records[-1]["params_moved"] < 1 and records[-1]["trainable_fraction"] < 1


def test_sequence_loss_trains_every_token(tmp_path: Path) -> None:
    """The sequence loss is the mean NLL of every real next token, not only the target."""
    task = toy_task()
    model = tiny_model()
    cfg = TuneConfig(mode="full", loss="sequence", **FAST)
    tuner = CircuitTuner(model, task, cfg)
    rows = torch.arange(6)
    with torch.no_grad():
        logits = model(task.train_tokens[rows])
        loss, _ = tuner._loss(logits, rows)
    real = task.train_attention_mask[rows]
    valid = real[:, 1:] & real[:, :-1]
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, task.train_tokens[rows][:, 1:, None])[..., 0]
    torch.testing.assert_close(loss, nll[valid].mean())
    target_loss, _ = CircuitTuner(model, task, TuneConfig(mode="full", **FAST))._loss(logits, rows)
    assert not torch.isclose(loss, target_loss)


def test_options_are_cli_flags() -> None:
    import argparse

    from ctlens.cli.tune import add_tune_command, config_from_args

    parser = argparse.ArgumentParser()
    add_tune_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--out", "x", "--selection", "top_nodes", "--optimizer",
                              "sgd", "--momentum", "0.5", "--loss", "sequence"])
    cfg = config_from_args(args)
    assert (cfg.selection, cfg.optimizer, cfg.momentum, cfg.loss) == \
        ("top_nodes", "sgd", 0.5, "sequence")
    with pytest.raises(ValueError, match="momentum must be in"):
        TuneConfig(momentum=1.0)
    # a run.json written before these options reads as what it was: AdamW, target loss
    old = {k: v for k, v in TuneConfig().to_dict().items()
           if k not in ("selection", "optimizer", "loss", "momentum")}
    assert TuneConfig.from_dict(old) == TuneConfig()


@pytest.mark.parametrize("match", ["parameters", "composition"])
def test_random_control_matches_the_discovered_circuits_parameters(match: str) -> None:
    from ctlens.tuning.controls import trainable_count

    model = tiny_model()
    cfg = TuneConfig(mode="random", random_match=match, **FAST)
    tuner = CircuitTuner(model, toy_task(), cfg)
    scores, _ = tuner._batch_discovery(0)
    target = tuner.discovery.select(scores, 0)
    control = tuner._random_circuit(0)
    assert not torch.equal(control.mask, target.mask)
    want, got = trainable_count(model, target, cfg), trainable_count(model, control, cfg)
    drawer = tuner.discovery._control
    sends, reads = control.mask.any(1), control.mask.any(0)
    left: dict[str, list[int]] = {}
    for (role, i, kind), size in zip(drawer.nodes, drawer.sizes, strict=True):
        if not (sends[i] if role == "sender" else reads[i]):
            left.setdefault(kind, []).append(size)
    # short of the budget by less than the smallest node left (of the kind), plus the b_O a
    # layer's heads share (counted once per head in the node sizes)
    overlap = model.cfg.n_layers * model.cfg.n_heads * model.cfg.d_model
    slack = min(min(v) for v in left.values()) + overlap
    assert want - slack <= got <= want, (want, got)
    total = W.count_real_parameters(model)
    assert control.metadata["discovered_trainable_fraction"] == pytest.approx(want / total)
    if match == "composition":  # the same parameters per node kind, up to one node each
        budgets = drawer.budgets(target, by_kind=True)
        drawn = drawer.budgets(control, by_kind=True)
        for kind, budget in budgets.items():
            kind_slack = min(left.get(kind, [0])) + overlap
            assert budget - kind_slack <= drawn.get(kind, 0) <= budget, kind
    # the edges-matched control keeps N edges
    edges = CircuitTuner(model, toy_task(), TuneConfig(mode="random", random_match="edges",
                                                       **FAST))._random_circuit(0)
    assert edges.n_edges == 30


def test_random_match_default_and_legacy_runs() -> None:
    assert TuneConfig(mode="random").random_match == "parameters"
    legacy = {k: v for k, v in TuneConfig(mode="random").to_dict().items()
              if k != "random_match"}
    assert TuneConfig.from_dict(legacy).random_match == "edges"  # resumes as what it was
    # outside random runs random_match does not matter for resuming
    old = {k: v for k, v in TuneConfig().to_dict().items() if k != "random_match"}
    assert TuneConfig.from_dict(old).semantic_dict() == TuneConfig().semantic_dict()
    with pytest.raises(ValueError, match="random_match must be one of"):
        TuneConfig(random_match="nodes")


def test_random_run_records_both_fractions(tmp_path: Path) -> None:
    cfg = TuneConfig(mode="random", **{**FAST, "steps": 2, "eval_every": 1})
    result = CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "r")
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text()
               .splitlines()]
    for record in records[1:]:
        mine, theirs = record["trainable_fraction"], record["discovered_trainable_fraction"]
        assert 0 < mine <= theirs < 1 and theirs - mine < 0.05, record


def _one_node(graph: ctlens.Graph, role: str, index: int) -> torch.Tensor:
    """The mask that unlocks one node alone (a sender by its edge to logits, a receiver by
    its edge from input)."""
    mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    if role == "sender":
        mask[index, graph.n_receivers - 1] = True
    else:
        mask[0, index] = True
    return mask


def _nodes_of(circuit: ctlens.Circuit) -> dict[tuple[str, int], str]:
    """{(role, index): kind} of the nodes (but input and logits) the circuit unlocks."""
    graph = circuit.graph
    out = {}
    for role, nodes, used in (("sender", graph.sender_nodes, circuit.mask.any(1)),
                              ("receiver", graph.receiver_nodes, circuit.mask.any(0))):
        for i, node in enumerate(nodes):
            if bool(used[i]) and node.kind.value not in ("input", "logits"):
                out[(role, i)] = f"{role}:{node.kind.value}"
    return out


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("match", ["parameters", "composition"])
def test_random_control_bound_holds_at_every_step(match: str, groups: int,
                                                  tmp_path: Path) -> None:
    """At every step of a run, counted independently on the union of parameters (the
    parameter rules' masks of whole circuits, b_O once per layer): the random circuit never
    exceeds the discovered one's count (per kind for composition), and falls short by less
    than the smallest amount a node it did not draw would add."""
    from ctlens.tuning.controls import trainable_count

    model = tiny_model()
    steps = 12
    cfg = TuneConfig(mode="random", random_match=match, mlp_groups=groups,
                     **{**FAST, "steps": steps, "top_n": 12})
    tuner = CircuitTuner(model, toy_task(), cfg)
    seen: list[tuple[int, ctlens.Circuit, ctlens.Circuit]] = []
    draw = tuner.discovery.matched_random_circuit

    def spy(target: ctlens.Circuit, t: int) -> ctlens.Circuit:
        control = draw(target, t)
        seen.append((t, target, control))
        return control

    tuner.discovery.matched_random_circuit = spy  # type: ignore[method-assign]
    tuner.run(tmp_path / "r")
    assert [t for t, _, _ in seen] == list(range(steps))
    graph = tuner.graph
    every = {(role, i): f"{role}:{n.kind.value}"
             for role, nodes in (("sender", graph.sender_nodes),
                                 ("receiver", graph.receiver_nodes))
             for i, n in enumerate(nodes) if n.kind.value not in ("input", "logits")}

    def count(nodes: list[tuple[str, int]]) -> int:
        mask = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        for role, i in nodes:
            mask |= _one_node(graph, role, i)
        return trainable_count(model, ctlens.Circuit(graph, mask, None, {}), cfg)

    short_by = []
    for _, target, control in seen:
        wanted, drawn = _nodes_of(target), _nodes_of(control)
        assert control.metadata["discovered_trainable_fraction"] == pytest.approx(
            trainable_count(model, target, cfg) / W.count_real_parameters(model))
        kinds = sorted(set(every.values())) if match == "composition" else [None]
        for kind in kinds:
            def of_kind(nodes: dict, kind: str | None = kind) -> list[tuple[str, int]]:
                return [n for n, k in nodes.items() if kind is None or k == kind]

            budget, matched = count(of_kind(wanted)), count(of_kind(drawn))
            assert matched <= budget, (kind, matched, budget)
            left = [count([*of_kind(drawn), n]) - matched for n in of_kind(every)
                    if n not in drawn]
            if left:
                assert budget - matched < min(left), (kind, budget, matched, min(left))
            else:
                assert matched == budget
            short_by.append(budget - matched)
    assert any(short_by)  # the draws were not all exact: the bound was really exercised


def test_general_loss_has_its_own_number_of_rows(tmp_path: Path) -> None:
    """general_examples, not eval_examples, sets the rows of the general LM loss."""
    from ctlens.tuning.evaluation import Evaluator

    task = toy_task()
    model = tiny_model()
    rows = [float(_lm_loss(model, task.general_tokens[:k])) for k in (2, 3, 4)]
    assert len(set(rows)) == 3  # the row count changes the number
    for eval_examples, general_examples, expected in ((6, 2, rows[0]), (2, 3, rows[1]),
                                                      (6, None, rows[2]), (1, 99, rows[2])):
        cfg = TuneConfig(**{**FAST, "eval_examples": eval_examples,
                            "general_examples": general_examples})
        evaluator = Evaluator(model, task, cfg, ctlens.Graph.from_model(model), "toy")
        with torch.no_grad():
            assert evaluator.general_loss() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="general_examples must be a positive integer"):
        TuneConfig(general_examples=0)
    # a run.json written before the option measured eval_examples rows: it reads as that
    old = {k: v for k, v in TuneConfig(eval_examples=48).to_dict().items()
           if k != "general_examples"}
    assert TuneConfig.from_dict(old).general_examples == 48
    assert TuneConfig().general_examples == 128


def _lm_loss(model: object, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(tokens)
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None]).mean()


def test_cli_seed_leaves_the_task_sample_to_data_seed(tmp_path: Path, capsys) -> None:
    """`ctlens tune --seed` changes the batch order and random draws only: the task sample
    (every tensor's sha256 in run.json) follows --data-seed, and --general-examples sets the
    general rows the task is loaded with."""
    from ctlens.cli import main

    def data(*flags: str) -> dict:
        out = tmp_path / "-".join(flags)
        argv = ["tune", "--model", "zoo:tiny-gpt2", "--steps", "1", "--batch-size", "4",
                "--n-examples", "8", "--n-train", "16", "--eval-examples", "4",
                "--general-examples", "6", "--top-n", "0.02", "--no-export",
                "--no-progress", "--out", str(out), *flags]
        assert main(argv) == 0, capsys.readouterr().err
        return json.loads((out / "run.json").read_text())["data"]

    base = data()
    assert base["n_general"] == 6
    assert data("--seed", "3") == base
    moved = data("--data-seed", "3")
    assert moved["train_sha256"] != base["train_sha256"]
    assert moved["general_sha256"] != base["general_sha256"]


def test_the_tuner_takes_the_callers_graph_and_checks_it() -> None:
    """A graph the caller built is used as it is (not rebuilt); one of another grouping or
    another model is refused in one error that says what to pass."""
    model, task = tiny_model(), toy_task()
    graph = ctlens.Graph.from_model(model)
    assert CircuitTuner(model, task, TuneConfig(**FAST), graph=graph).graph is graph
    with pytest.raises(ValueError, match="1 MLP group.*Pass that graph, or none"):
        CircuitTuner(model, task, TuneConfig(**FAST),
                     graph=ctlens.Graph.from_model(model, mlp_groups=2))
    with pytest.raises(ValueError, match="belongs to another model's graph"):
        CircuitTuner(model, task, TuneConfig(**FAST),
                     graph=ctlens.Graph.from_model(tiny_model("llama")))


def test_cli_tune_builds_the_graph_once(tmp_path: Path, monkeypatch, capsys) -> None:
    """`ctlens tune` checks the sizes on the model's graph before building the task and
    hands that graph to the tuner, which does not build another."""
    from ctlens.cli import main

    built = []
    original = ctlens.Graph.from_model.__func__

    def counting(cls: type, *args: object, **kwargs: object) -> ctlens.Graph:
        built.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ctlens.Graph, "from_model", classmethod(counting))
    argv = ["tune", "--model", "zoo:tiny-gpt2", "--steps", "1", "--batch-size", "4",
            "--n-examples", "8", "--n-train", "16", "--eval-examples", "4",
            "--general-examples", "6", "--top-n", "0.02", "--no-export", "--no-progress",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(built) == 1
