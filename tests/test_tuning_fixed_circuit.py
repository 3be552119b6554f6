"""Tuning inside a fixed circuit (``CircuitTuner(..., circuit=)``, ``ctlens tune --circuit``):
no rediscovery, a random control drawn once against it, resume only with the same circuit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tuning_toy import tiny_model, toy_task

import ctlens
from ctlens import Circuit, Graph
from ctlens.cli import main as cli_main
from ctlens.tuning import RunConflictError, TuneConfig
from ctlens.tuning import weights as W
from ctlens.tuning.controls import MatchedControl, trainable_count
from ctlens.tuning.runner import CircuitTuner

FAST = dict(top_n=30, steps=4, batch_size=6, lr=1e-2, eval_every=1, save_every=2,
            eval_examples=6, progress=False)


def fixed_circuit(graph: Graph, n: int = 25, seed: int = 4) -> Circuit:
    """A circuit no discovery would pick: random valid edges."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(graph.n_senders, graph.n_receivers, generator=gen)
    return Circuit.from_scores(ctlens.EdgeScores(noise, graph), top_n=n)


def snapshots(root: Path, model) -> list[Circuit]:
    """The circuit snapshots of every evaluation after step 0."""
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    return [Circuit.load(root / r["circuit_file"], model=model) for r in records[1:]]


def test_gradient_mode_tunes_inside_the_fixed_circuit_only(tmp_path: Path) -> None:
    model = tiny_model()
    graph = Graph.from_model(model)
    circuit = fixed_circuit(graph)
    before = {k: v.detach().clone() for k, v in W.hf_state_dict(model).items()}
    cfg = TuneConfig(mode="gradient", every_k=1, **FAST)
    result = CircuitTuner(model, toy_task(), cfg, circuit=circuit).run(tmp_path / "r")
    assert all(s == circuit for s in snapshots(result.out_dir, model))  # never rediscovered
    assert result.metrics["circuit_edges"] == 25
    doc = json.loads((result.out_dir / "run.json").read_text())
    assert doc["fixed_circuit"]["n_edges"] == 25
    after = W.hf_state_dict(model)
    sends = circuit.mask.any(1)
    untouched = [layer for layer in range(graph.spec.n_layers)
                 if not sends[graph.mlp_sender(layer)]]
    moved = [layer for layer in range(graph.spec.n_layers) if sends[graph.mlp_sender(layer)]]
    for layer in untouched:
        key = f"transformer.h.{layer}.mlp.c_proj.weight"
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[f"transformer.h.{layer}.mlp.c_proj.weight"],
                               after[f"transformer.h.{layer}.mlp.c_proj.weight"])
               for layer in moved)


@pytest.mark.parametrize("match", ["parameters", "edges"])
def test_random_mode_draws_one_control_matched_to_the_fixed_circuit(
    match: str, tmp_path: Path
) -> None:
    model = tiny_model()
    circuit = fixed_circuit(Graph.from_model(model))
    cfg = TuneConfig(mode="random", random_match=match, every_k=1, **FAST)
    budget = trainable_count(model, circuit, cfg)
    result = CircuitTuner(model, toy_task(), cfg, circuit=circuit).run(tmp_path / "r")
    drawn = snapshots(result.out_dir, model)
    assert all(c == drawn[0] for c in drawn) and drawn[0] != circuit  # drawn once
    if match == "edges":
        assert drawn[0].n_edges == circuit.n_edges
    else:
        total = W.count_real_parameters(model)
        assert drawn[0].metadata["discovered_trainable_fraction"] == budget / total
        # filled as the controls fill a budget: what is left is less than any node left out
        control = MatchedControl(model, circuit.graph, cfg)
        sends, reads = drawn[0].mask.any(1), drawn[0].mask.any(0)
        left_out = [size for (role, i, _), size in zip(control.nodes, control.sizes, strict=True)
                    if size and not bool((sends if role == "sender" else reads)[i])]
        assert 0 <= budget - trainable_count(model, drawn[0], cfg) < min(left_out)


@pytest.mark.parametrize("mode", ["both", "random"])
def test_resume_keeps_the_fixed_circuit_and_refuses_another(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = Graph.from_model(tiny_model())
    circuit = fixed_circuit(graph)
    cfg = TuneConfig(mode=mode, export=False, **{**FAST, "steps": 5})
    reference = tiny_model()
    CircuitTuner(reference, toy_task(), cfg, circuit=circuit).run(tmp_path / "a")
    original = CircuitTuner._train_step

    def stop(self, t, *args):
        if t >= 3:
            raise KeyboardInterrupt
        return original(self, t, *args)

    with monkeypatch.context() as m:
        m.setattr(CircuitTuner, "_train_step", stop)
        with pytest.raises(KeyboardInterrupt):
            CircuitTuner(tiny_model(), toy_task(), cfg, circuit=circuit).run(tmp_path / "b")
    with pytest.raises(RunConflictError, match="fixed_circuit"):
        CircuitTuner(tiny_model(), toy_task(), cfg,
                     circuit=fixed_circuit(graph, seed=5)).run(tmp_path / "b")
    resumed = tiny_model()
    CircuitTuner(resumed, toy_task(), cfg, circuit=circuit).run(tmp_path / "b")
    for a, b in zip(W.real_parameters(reference), W.real_parameters(resumed), strict=True):
        assert torch.equal(a, b)
    assert snapshots(tmp_path / "a", reference) == snapshots(tmp_path / "b", resumed)


def test_a_fixed_circuit_that_cannot_be_used_is_refused() -> None:
    model = tiny_model()
    circuit = fixed_circuit(Graph.from_model(model))
    with pytest.raises(ValueError, match="mode='full' has no circuit"):
        CircuitTuner(model, toy_task(), TuneConfig(mode="full", **FAST), circuit=circuit)
    grouped = fixed_circuit(Graph.from_model(model, mlp_groups=2))
    with pytest.raises(ValueError, match="mlp_groups=2"):
        CircuitTuner(model, toy_task(), TuneConfig(mode="gradient", **FAST), circuit=grouped)
    with pytest.raises(ValueError, match="no edges"):
        CircuitTuner(model, toy_task(), TuneConfig(mode="gradient", **FAST),
                     circuit=Circuit.empty(Graph.from_model(model)))
    with pytest.raises(TypeError, match="ctlens.Circuit"):
        CircuitTuner(model, toy_task(), TuneConfig(mode="gradient", **FAST), circuit="c.json")


def test_cli_tune_circuit_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = ctlens.load_model("zoo:tiny-gpt2")
    path = fixed_circuit(Graph.from_model(model), n=40).save(tmp_path / "c.json")
    argv = ["tune", "--model", "zoo:tiny-gpt2", "--task", "agreement-flip", "--circuit",
            str(path), "--n-examples", "8", "--n-train", "16", "--steps", "2",
            "--batch-size", "4", "--eval-every", "2", "--eval-examples", "4", "--no-export",
            "--no-progress", "--threads", "1", "--out", str(tmp_path / "run")]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert f"inside the 40-edge circuit of {path}" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["circuit_edges"] == 40
    assert Circuit.load(tmp_path / "run" / "circuits" / "step_000002.json") == \
        Circuit.load(path)
    for extra, words in ((["--circuit", str(tmp_path / "none.json")], "no such file"),
                         (["--circuit", str(path), "--mode", "full"], "--mode full has none")):
        assert cli_main(["tune", "--out", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("ctlens tune: error:") and words in err, err
