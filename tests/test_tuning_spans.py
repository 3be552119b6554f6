"""Circuit-tuning with positional circuits (issue 22, ``TuneConfig(spans=True)``, ``ctlens
tune --spans``): discovery, forward masks and gradient restriction per (edge, span) pair.

Oracles: `ctlens.attribute` with ``spans=True`` on the training batch (batch discovery), a
hand-made patch at one span's positions (the training forward mask), the position-free run
on the circuit's node set (gradient mode moves a node at any span), and the position-free
run itself (a circuit that keeps each edge at every span or at none tunes like it).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tuning_toy import SPAN_NAMES as NAMES
from tuning_toy import finish_all, launch_ranks, tiny_model, toy_task
from tuning_toy import spanned_toy_task as spanned_task

import ctlens
from ctlens import Circuit, EdgeScores, Graph
from ctlens.cli import main as cli_main
from ctlens.tuning import TuneConfig
from ctlens.tuning import weights as W
from ctlens.tuning.discovery import CircuitSelection, top_nodes_rank
from ctlens.tuning.runner import CircuitTuner

FAST = dict(top_n=30, steps=2, batch_size=6, lr=1e-2, eval_every=1, save_every=2,
            eval_examples=6, progress=False)


def random_circuit(graph: Graph, n: int, seed: int = 4) -> Circuit:
    """``n`` random valid edges ((edge, span) pairs on a positional graph)."""
    noise = torch.rand(graph.dense_shape, generator=torch.Generator().manual_seed(seed))
    return Circuit.from_scores(EdgeScores(noise, graph), top_n=n)


def records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- discovery


@pytest.mark.parametrize(("family", "groups"), [("gpt2", 1), ("llama", 1), ("gpt2", 4)])
def test_positional_batch_discovery_equals_attribute_with_spans(family: str, groups: int):
    """``"batch"`` discovery on a positional run is `ctlens.attribute(..., spans=True)` on
    the training batch with its own span labels, and sums over spans to the position-free
    run's batch scores."""
    model, task = tiny_model(family), spanned_task()
    cfg = dict(mode="forward", batch_size=6, top_n=30, mlp_groups=groups)
    tuner = CircuitTuner(model, task, TuneConfig(spans=True, **cfg))
    assert tuner.graph.spans == NAMES and tuner.graph.spec.mlp_groups == groups
    rows = tuner._global_rows(3)
    batch = tuner.batch_scores(3).scores
    expected = ctlens.attribute(model, task.train_data[rows], ablation="mean", batch_size=None,
                                progress=False, graph=tuner.graph).scores
    assert batch.shape == (*tuner.graph.valid.shape, 3) and batch.abs().max() > 0
    torch.testing.assert_close(batch, expected, atol=1e-6, rtol=1e-4)
    free = CircuitTuner(model, task, TuneConfig(**cfg)).batch_scores(3).scores
    torch.testing.assert_close(batch.sum(-1), free, atol=1e-6, rtol=1e-4)


def test_positional_batch_discovery_with_the_loss_metric_sums_to_the_position_free() -> None:
    """``batch_metric="loss"`` (the loss's own backward): per-span scores sum to the
    position-free scores, which `tests/test_tuning.py` checks against `ctlens.attribute`."""
    model, task = tiny_model(), spanned_task()
    cfg = dict(mode="gradient", batch_metric="loss", batch_size=6, top_n=30)
    pos = CircuitTuner(model, task, TuneConfig(spans=True, **cfg)).batch_scores(2).scores
    free = CircuitTuner(model, task, TuneConfig(**cfg)).batch_scores(2).scores
    assert pos.shape == (*free.shape, 3) and float(pos.abs().min(-1).values.max()) > 0
    torch.testing.assert_close(pos.sum(-1), free, atol=1e-6, rtol=1e-4)


def test_gradient_mode_enters_the_top_pairs_of_its_training_batch(tmp_path: Path) -> None:
    """In gradient mode the recorded training forward scores the step's batch per span: the
    circuit in force after step 0 is the top N (edge, span) pairs of `ctlens.attribute` with
    spans on that batch, at the start weights."""
    task = spanned_task()
    cfg = TuneConfig(mode="gradient", spans=True, **{**FAST, "steps": 1})
    tuner = CircuitTuner(tiny_model(), task, cfg)
    rows = tuner._global_rows(0)
    tuner.run(tmp_path / "run")
    scores = ctlens.attribute(tiny_model(), task.train_data[rows], ablation="mean",
                              batch_size=None, progress=False, spans=True)
    expected = Circuit.from_scores(scores, top_n=30)
    in_force = Circuit.load(tmp_path / "run" / records(tmp_path / "run")[1]["circuit_file"])
    assert in_force.spans == NAMES and torch.equal(in_force.mask, expected.mask)


def test_positional_task_discovery_equals_attribute_with_spans() -> None:
    """``"task"`` discovery scores the window of discovery pairs per span."""
    model, task = tiny_model(), spanned_task()
    cfg = TuneConfig(mode="gradient", discovery="task", discovery_ablation="corrupt",
                     spans=True, batch_size=4, discovery_batches=2, top_n=30)
    tuner = CircuitTuner(model, task, cfg)
    expected = ctlens.attribute(model, task.discovery[:8], ablation="corrupt", spans=True,
                                batch_size=4, progress=False).scores
    got = tuner.discovery.task_scores(0)
    assert got.shape == expected.shape == (*tuner.graph.valid.shape, 3)
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-5)


def test_trainer_callback_selects_the_tuners_positional_circuit() -> None:
    """`ctlens.CircuitTuningCallback` with ``spans=True`` selects what the tuner's task
    discovery selects: (edge, span) pairs over the discovery data's spans."""
    model, task = tiny_model(), spanned_task()
    cfg = TuneConfig(mode="gradient", discovery="task", spans=True, batch_size=4, top_n=30)
    circuit = ctlens.CircuitTuningCallback(model, task, cfg).discover(0)
    tuner = CircuitTuner(model, task, cfg)
    expected = tuner.discovery.select(tuner.discovery.task_scores(0), 0)
    assert circuit.spans == NAMES and circuit.n_edges == 30
    assert torch.equal(circuit.mask, expected.mask)


def test_positional_top_nodes_ranks_pairs_like_the_position_free_edges() -> None:
    """Scores spread evenly over the spans rank every (edge, span) pair as its edge ranks
    position-free: a node's sum runs over all its spans. The tuner's selection keeps the
    top N pairs of that rank, with the plain scores."""
    graph = Graph.from_model(tiny_model(), spans=NAMES)
    free = Graph.from_model(tiny_model())
    scores = torch.randn(free.valid.shape, generator=torch.Generator().manual_seed(0))
    spread = scores[..., None].expand(graph.dense_shape) / 3
    expected = top_nodes_rank(scores, free)[..., None].expand(graph.dense_shape) / 3
    torch.testing.assert_close(top_nodes_rank(spread, graph), expected, rtol=1e-5, atol=0)
    noisy = torch.randn(graph.dense_shape, generator=torch.Generator().manual_seed(1))
    cfg = TuneConfig(selection="top_nodes", spans=True, top_n=40)
    chosen = CircuitSelection(cfg, graph, None).select(noisy, 0)
    rank = top_nodes_rank(noisy, graph)
    valid = graph.dense_valid
    assert chosen.n_edges == 40 and torch.equal(chosen.scores[valid], noisy[valid])
    assert float(rank[chosen.mask].min()) >= float(rank[valid & ~chosen.mask].max())


# ---------------------------------------------------------------------- enforcement


def test_training_forward_mask_is_a_hand_made_patch_at_one_span(tmp_path: Path) -> None:
    """The training forward of a positional circuit lacking one (edge, span) pair is the
    model with that sender's output replaced by its per-position training mean into that
    receiver, at the batch's positions of that span only (the batch's own labels)."""
    model, task = tiny_model(), spanned_task()
    graph = Graph.from_model(model, spans=NAMES)
    (s, r), k = graph.edge_index("a0.h1", "m1"), 1
    keep = graph.dense_valid.clone()
    keep[s, r, k] = False
    cfg = TuneConfig(mode="forward", spans=True, **{**FAST, "steps": 1})
    tuner = CircuitTuner(model, task, cfg, circuit=Circuit(graph, keep))
    rows = tuner._global_rows(0)
    tokens, real = task.train_tokens[rows], task.train_attention_mask[rows]
    with torch.no_grad():  # the oracle, on the weights before the step
        _, cache = model.run_with_cache(tokens)
        head = cache["blocks.0.attn.hook_result"][:, :, 1]  # a0.h1's output
        weight = real[..., None].float()
        mean = (head * weight).sum(0) / weight.sum(0)
        where = (task.train_data.spans[rows] == k)[..., None]

        def patch(x: torch.Tensor, hook: object) -> torch.Tensor:
            return x + where * (mean - head)

        expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_in", patch)])
        plain = model(tokens)
    seen = []
    loss = tuner._loss

    def recording(logits: torch.Tensor, local: torch.Tensor):
        seen.append((logits.detach().clone(), local.clone()))
        return loss(logits, local)

    tuner._loss = recording  # type: ignore[method-assign]
    tuner.run(tmp_path / "run")
    logits, local = seen[0]
    assert torch.equal(local, rows)
    assert float((plain - expected)[real].abs().max()) > 1e-3  # the patch does something
    torch.testing.assert_close(logits[real], expected[real], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_gradient_mode_moves_a_node_in_the_circuit_at_any_span(
    groups: int, tmp_path: Path
) -> None:
    """Gradient restriction opens a node's parameters when it is in the circuit at any
    span: every slice the rules freeze is bit-identical after training, the opened ones
    move, and the positional run trains exactly as the position-free run on its edge set."""
    from ctlens.masking.rules import parameter_rules

    task = spanned_task()
    model = tiny_model()
    graph = Graph.from_model(model, mlp_groups=groups, spans=NAMES)
    circuit = random_circuit(graph, 40)
    counts = circuit.mask.sum(-1)
    assert bool((counts == 1).any()) and bool((counts > 1).any())  # one span and several
    coarse = Circuit(Graph.from_model(model, mlp_groups=groups), circuit.sender_receiver_mask)
    start = tiny_model()
    cfg = dict(mode="gradient", mlp_groups=groups, **{**FAST, "steps": 3})
    CircuitTuner(model, task, TuneConfig(spans=True, **cfg), circuit=circuit).run(tmp_path / "p")
    ends = dict(model.named_parameters())
    names = {id(p): n for n, p in start.named_parameters()}
    moved = 0
    rules = parameter_rules(start, circuit)
    for rule in rules:
        before, after = rule.parameter.detach(), ends[names[id(rule.parameter)]].detach()
        assert torch.equal(after[~rule.trainable], before[~rule.trainable])
        moved += int((after[rule.trainable] != before[rule.trainable]).sum())
    assert moved > 0
    fixed = [name for name, _ in start.named_parameters()
             if any(part in name for part in ("ln_", "wte", "wpe"))]
    assert len(fixed) == 12  # LayerNorms and embeddings never move (no train_embeddings)
    for name in fixed:
        assert torch.equal(dict(start.named_parameters())[name], ends[name]), name
    other = tiny_model()
    CircuitTuner(other, task, TuneConfig(**cfg), circuit=coarse).run(tmp_path / "f")
    for a, b in zip(W.real_parameters(model), W.real_parameters(other), strict=True):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in records(tmp_path / "p")[1:]] == \
        [r["train_loss"] for r in records(tmp_path / "f")[1:]]


@pytest.mark.parametrize(("mode", "groups"), [("forward", 1), ("both", 1), ("forward", 2)])
def test_a_circuit_at_every_span_or_none_tunes_like_the_position_free_one(
    mode: str, groups: int, tmp_path: Path
) -> None:
    """The strongest oracle: a positional circuit that keeps each edge at every span or at
    none is the position-free circuit, so the runs' losses, metrics and weights agree."""
    task = spanned_task()
    free_graph = Graph.from_model(tiny_model(), mlp_groups=groups)
    graph = Graph.from_model(tiny_model(), mlp_groups=groups, spans=NAMES)
    free = random_circuit(free_graph, 25)
    every = Circuit(graph, free.mask[..., None].expand(graph.dense_shape).clone())
    cfg = dict(mode=mode, mlp_groups=groups, **{**FAST, "steps": 3})
    models = [tiny_model(), tiny_model()]
    CircuitTuner(models[0], task, TuneConfig(**cfg), circuit=free).run(tmp_path / "f")
    CircuitTuner(models[1], task, TuneConfig(spans=True, **cfg), circuit=every).run(
        tmp_path / "p")
    a, b = records(tmp_path / "f"), records(tmp_path / "p")
    for key in ("train_loss", "target_metric", "target_metric_masked", "general_loss"):
        torch.testing.assert_close(torch.tensor([r.get(key, 0.0) for r in b]),
                                   torch.tensor([r.get(key, 0.0) for r in a]),
                                   rtol=1e-5, atol=1e-6, msg=key)
    moved = [float((x - y).abs().max()) for x, y in zip(W.real_parameters(models[0]),
                                                          W.real_parameters(models[1]),
                                                          strict=True)]
    assert max(moved) < 1e-5, max(moved)
    assert a[-1]["params_moved"] > 0


# ---------------------------------------------------------------------- run directory


def test_positional_run_saves_span_circuits_resumes_and_reports(tmp_path: Path) -> None:
    """A positional run (batch discovery, forward masks) writes schema-2 circuits with the
    span names, resumes exactly from a checkpoint, and its report has span columns."""
    cfg = TuneConfig(mode="both", spans=True, **{**FAST, "steps": 4})
    reference = tiny_model()
    CircuitTuner(reference, spanned_task(), cfg).run(tmp_path / "a")
    stopped = tiny_model()
    tuner = CircuitTuner(stopped, spanned_task(), cfg)
    train = tuner._train_step

    def failing(t: int, *args: object) -> None:
        if t == 2:
            raise RuntimeError("stopped at step 2")
        train(t, *args)

    tuner._train_step = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="stopped"):
        tuner.run(tmp_path / "b")
    resumed = tiny_model()
    CircuitTuner(resumed, spanned_task(), cfg).run(tmp_path / "b")
    for a, b in zip(W.real_parameters(reference), W.real_parameters(resumed), strict=True):
        assert torch.equal(a, b)
    doc = json.loads((tmp_path / "a" / "run.json").read_text())
    assert doc["graph"]["spans"] == list(NAMES) and doc["config"]["spans"] is True
    for record in records(tmp_path / "a")[1:]:
        saved = json.loads((tmp_path / "a" / record["circuit_file"]).read_text())
        assert saved["graph"]["spans"] == list(NAMES)
        circuit = Circuit.load(tmp_path / "a" / record["circuit_file"])
        assert circuit.spans == NAMES and circuit.n_edges == 30
    assert [Circuit.load(tmp_path / "a" / r["circuit_file"]) for r in records(tmp_path / "a")] \
        == [Circuit.load(tmp_path / "b" / r["circuit_file"]) for r in records(tmp_path / "b")]
    text = ctlens.viz.write_report(tmp_path / "a").read_text(encoding="utf-8")
    assert "This run's circuits are positional" in text


def test_resuming_on_other_span_labels_is_refused(tmp_path: Path) -> None:
    """``run.json`` records a positional run's span labels: the same names on other
    tokens is other data."""
    from ctlens.tuning import RunConflictError

    cfg = TuneConfig(mode="gradient", spans=True, **{**FAST, "steps": 1})
    CircuitTuner(tiny_model(), spanned_task(), cfg).run(tmp_path / "run")
    task = spanned_task()
    labels = task.train_data.spans
    swapped = torch.where(labels == 0, 1, torch.where(labels == 1, 0, labels))
    moved = replace(task, train_data=replace(task.train_data, spans=swapped))
    with pytest.raises(RunConflictError, match="spans_sha256"):
        CircuitTuner(tiny_model(), moved, cfg).run(tmp_path / "run")
    CircuitTuner(tiny_model(), spanned_task(), cfg).run(tmp_path / "run")  # same: resumes


@pytest.mark.parametrize("match", ["edges", "parameters", "composition"])
def test_random_controls_with_spans(match: str, tmp_path: Path) -> None:
    """``random`` draws N (edge, span) pairs, or nodes matched on trainable parameters to
    the discovered circuit (never more), each drawn edge kept at every span."""
    cfg = TuneConfig(mode="random", random_match=match, spans=True, **FAST)
    CircuitTuner(tiny_model(), spanned_task(), cfg).run(tmp_path / "r")
    for record in records(tmp_path / "r")[1:]:
        circuit = Circuit.load(tmp_path / "r" / record["circuit_file"])
        assert circuit.spans == NAMES
        if match == "edges":
            assert circuit.n_edges == 30
            continue
        assert bool((circuit.mask.any(-1) == circuit.mask.all(-1)).all())
        assert 0 < record["trainable_fraction"] <= record["discovered_trainable_fraction"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_full_and_lora_snapshot_positional_monitor_circuits(mode: str, tmp_path: Path) -> None:
    """Without a circuit to train in, the snapshots are the task's positional circuit of
    the current weights: at step 0, the top N pairs of `ctlens.attribute` with spans."""
    if mode == "lora":
        pytest.importorskip("peft")
    task = spanned_task()
    cfg = TuneConfig(mode=mode, spans=True, **FAST)
    CircuitTuner(tiny_model(), task, cfg).run(tmp_path / "r")
    circuits = [Circuit.load(tmp_path / "r" / r["circuit_file"])
                for r in records(tmp_path / "r")]
    assert all(c.spans == NAMES and c.n_edges == 30 for c in circuits)
    scores = ctlens.attribute(tiny_model(), task.discovery[:6], ablation="mean", batch_size=6,
                              progress=False, spans=True)
    assert torch.equal(circuits[0].mask, Circuit.from_scores(scores, top_n=30).mask)


def test_two_rank_data_parallel_positional_run_matches_single_process(tmp_path: Path) -> None:
    """Under torchrun-style data parallelism each rank masks and scores its own rows with
    their span labels: the ranks' summed batch scores are the single process's, and the
    weights end identical on both ranks and close to the single-process run. SGD: AdamW
    would magnify the rounding of gradients that are zero up to rounding (a key bias's,
    say) into steps of up to lr / 10, differently on one process and on two."""
    config = {**FAST, "mode": "both", "spans": True, "steps": 3, "eval_every": 3,
              "save_every": 3, "export": False, "optimizer": "sgd"}
    dump = tmp_path / "dump"
    dump.mkdir()
    finish_all(launch_ranks({"out": str(tmp_path / "ddp"), "config": config, "spans": True},
                            2, dump))
    rank0 = torch.load(dump / "rank0.pt", weights_only=True)
    rank1 = torch.load(dump / "rank1.pt", weights_only=True)
    model = tiny_model()
    tuner = CircuitTuner(model, spanned_task(), TuneConfig(**config))
    single = tuner.batch_scores(0).scores
    assert single.ndim == 3
    torch.testing.assert_close(rank0["scores"], single, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rank1["scores"], rank0["scores"], atol=0, rtol=0)
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    tuner.run(tmp_path / "single")
    single_weights = W.unique_state_dict(model)
    for k, v in rank0["weights"].items():
        torch.testing.assert_close(v, single_weights[k].detach(), atol=1e-6, rtol=1e-5)


def test_cli_tune_with_spans_and_a_positional_circuit_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = ctlens.load_model("zoo:tiny-gpt2")
    names = ctlens.tasks.load("agreement", n=4, n_train=4).discovery.span_names
    path = random_circuit(Graph.from_model(model, spans=names), 40).save(tmp_path / "c.json")
    base = ["tune", "--model", "zoo:tiny-gpt2", "--task", "agreement-flip", "--n-examples",
            "8", "--n-train", "16", "--steps", "2", "--batch-size", "4", "--eval-every", "2",
            "--eval-examples", "4", "--no-export", "--no-progress", "--threads", "1"]
    assert cli_main([*base, "--spans", "--circuit", str(path), "--out",
                     str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["circuit_edges"] == 40
    assert Circuit.load(tmp_path / "run" / "circuits" / "step_000002.json") == \
        Circuit.load(path)
    other = random_circuit(Graph.from_model(model, spans=("x", "y")), 10).save(
        tmp_path / "o.json")
    free = random_circuit(Graph.from_model(model), 10).save(tmp_path / "f.json")
    for extra, words in (
        (["--spans", "--circuit", str(other)], "spans ['x', 'y'] do not match the task's"),
        (["--circuit", str(path)], "is positional (spans"),
        (["--spans", "--circuit", str(free)], "is position-free but the run is positional"),
        (["--spans", "--shard", "fsdp"], "not supported with shard='fsdp'"),
    ):
        assert cli_main([*base, *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("ctlens tune: error:") and words in err, err


def test_a_jsonl_task_with_spans_labels_its_training_rows(tmp_path: Path) -> None:
    """A JSONL task's training rows (prompt + answer) keep the prompt's span labels, the
    answer going to ``other``, so ``--spans`` can tune on a user's task."""
    lines = [{"prompt": p, "corrupt_prompt": c, "answer": a, "wrong_answer": w,
              "spans": {"subject": [4, len(p.split(" near")[0])]}}
             for p, c, a, w in (("the key near the doors", "the keys near the doors", "is",
                                 "are"),
                                ("the dogs near the cat", "the dog near the cat", "are", "is"))]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    task = ctlens.tasks.load(str(path), tokenizer=ctlens.zoo.tokenizer())
    prompts, train = task.discovery, task.train_data
    assert prompts.span_names == train.span_names == ("subject", "other")
    width = prompts.clean.shape[1]
    assert torch.equal(train.spans[:, :width], prompts.spans)
    answers = task.train_target_mask.nonzero()
    assert (train.spans[answers[:, 0], answers[:, 1]] == 1).all()
    assert int((train.spans == 0).sum()) == 2  # "key", "dogs"
    model = ctlens.load_model("zoo:tiny-gpt2")
    tuner = CircuitTuner(model, task, TuneConfig(mode="forward", spans=True, **FAST))
    assert tuner.graph.spans == ("subject", "other") and tuner.batch_scores(0).scores.ndim == 3


@pytest.mark.slow  # about 10 s per zoo model on one core
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "mini-gpt2"])
def test_every_zoo_model_tunes_with_spans_and_reports(name: str, tmp_path: Path) -> None:
    """``ctlens tune --spans`` (forward masks and gradient restriction) then ``ctlens report``
    on each zoo model: positional snapshots with the task's spans, span columns drawn."""
    out = tmp_path / "run"
    argv = ["tune", "--model", f"zoo:{name}", "--task", "agreement-flip", "--spans", "--mode",
            "both", "--top-n", "0.02", "--n-examples", "8", "--n-train", "16", "--steps", "2",
            "--batch-size", "4", "--eval-every", "1", "--eval-examples", "4", "--no-export",
            "--no-progress", "--threads", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    names = ctlens.tasks.load("agreement", n=4, n_train=4).discovery.span_names
    for record in records(out):
        assert Circuit.load(out / record["circuit_file"]).spans == names
    assert math.isfinite(records(out)[-1]["target_metric_masked"])
    assert cli_main(["report", str(out)]) == 0
    assert "circuits are positional" in (out / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------- bad input


def test_positional_tuning_refuses_what_it_cannot_do() -> None:
    model, task = tiny_model(), spanned_task()
    graph = Graph.from_model(model, spans=NAMES)
    gradient = TuneConfig(mode="gradient", spans=True, **FAST)
    with pytest.raises(ValueError, match="spans=True \\(--spans\\) is not supported with "
                       "shard='fsdp'"):
        TuneConfig(spans=True, shard="fsdp")
    with pytest.raises(ValueError, match="the task's discovery data has no spans"):
        CircuitTuner(model, toy_task(), gradient)
    with pytest.raises(ValueError, match=r"training data \(task.train_data\) has no spans"):
        CircuitTuner(model, replace(task, train_data=toy_task().train_data), gradient)
    renamed = replace(task.train_data, span_names=("a", "b", "c"))
    with pytest.raises(ValueError, match=r"has spans \['a', 'b', 'c'\], but its discovery"):
        CircuitTuner(model, replace(task, train_data=renamed), gradient)
    plain_target = replace(task, evals={"toy": toy_task().evals["toy"]})
    CircuitTuner(model, plain_target, gradient)  # gradient mode masks no forward
    with pytest.raises(ValueError, match="target evaluation set 'toy' has no spans"):
        CircuitTuner(model, plain_target, replace(gradient, mode="forward"))
    with pytest.raises(ValueError, match="is positional .* run is position-free; tune with "
                       "spans=True"):
        CircuitTuner(model, task, replace(gradient, spans=False),
                     circuit=random_circuit(graph, 10))
    with pytest.raises(ValueError, match="is position-free but the run is positional"):
        CircuitTuner(model, task, gradient, circuit=random_circuit(Graph.from_model(model), 10))
    with pytest.raises(ValueError, match=r"graph= is positional \(spans \['early'"):
        CircuitTuner(model, task, replace(gradient, spans=False), graph=graph)
    assert CircuitTuner(model, task, gradient, graph=Graph.from_model(model)).graph == graph
    with pytest.raises(ValueError, match="this TaskData has no spans"):
        ctlens.CircuitTuningCallback(model, toy_task().discovery,
                                     TuneConfig(discovery="task", spans=True))
