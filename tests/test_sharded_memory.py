"""A sharded run never gathers the whole model: rules cut to local rows, params_moved from
local rows, and evaluation on every rank (issue 15, `ctlens.tuning.parallel.local_shards`).

The single-process tests check the local pieces against the whole-model oracles
(`parameter_rules`, `moved_fraction`); the gloo test (slow) runs a 2-rank sharded run with
`Sharding.gathered` made to raise and compares its metrics with one unsharded process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tuning_toy import finish_all, launch_ranks, tiny_model, toy_task

import ctlens
from ctlens import run_format as F
from ctlens.masking.rules import parameter_rules
from ctlens.tuning import TuneConfig
from ctlens.tuning import sharded_checkpoints as S
from ctlens.tuning import weights as W
from ctlens.tuning.parallel.local_shards import StartWeights, local_index, local_masks
from ctlens.tuning.rundir import RunDir, load_torch


@pytest.mark.parametrize("index", [(...,), (slice(2, 5),), (slice(None), slice(1, 3)),
                                   (slice(0, 7),), (slice(6, 7),), (slice(3, 3),)])
def test_local_index_cuts_like_chunk(index: tuple) -> None:
    """Opening ``index`` in the local rows equals cutting the opened whole mask the way
    ``torch.chunk`` splits it, for every rank of 1..4 ranks (some of them rowless)."""
    full = torch.zeros(7, 4, dtype=torch.bool)
    full[index] = True
    for size in (1, 2, 3, 4):
        chunks = full.chunk(size)
        width, start = -(-7 // size), 0
        for rank in range(size):
            start = min(rank * width, 7)
            rows = range(start, min(start + width, 7))
            got = torch.zeros(len(rows), 4, dtype=torch.bool)
            cut = local_index(index, rows, 7)
            if cut is not None:
                got[cut] = True
            want = chunks[rank] if rank < len(chunks) else full[:0]
            assert torch.equal(got, want), (index, size, rank)


def test_local_index_refuses_what_it_cannot_cut() -> None:
    with pytest.raises(ValueError, match="strided"):
        local_index((slice(0, 6, 2),), range(0, 4), 7)
    with pytest.raises(ValueError, match="dim 0 must be a slice"):
        local_index((3,), range(0, 4), 7)


def test_local_masks_of_a_whole_model_are_the_parameter_rules() -> None:
    """Unsharded, the masks built from shapes alone equal `parameter_rules`' (tiny Llama)."""
    model = tiny_model("llama")
    graph = ctlens.Graph.from_model(model)
    gen = torch.Generator().manual_seed(0)
    circuit = ctlens.Circuit.from_scores(
        ctlens.EdgeScores(torch.rand(graph.n_senders, graph.n_receivers, generator=gen),
                          graph, {}), top_n=40)
    for flags in ((False, False), (True, True)):
        rules = {r.name: r.trainable for r in parameter_rules(model, circuit, *flags)}
        masks = {name: keep for name, _, keep in local_masks(model, circuit, *flags)}
        assert masks.keys() == rules.keys()
        for name, keep in masks.items():
            assert torch.equal(keep, rules[name]), name
        assert any(bool(k.any()) for k in masks.values())


def test_start_weights_count_like_moved_fraction(tmp_path: Path) -> None:
    """`StartWeights` (read from the file) counts what `moved_fraction` (a whole snapshot)
    counts, tied weights once."""
    model = tiny_model("llama")
    path = tmp_path / "start.safetensors"
    W.save_weights(model, path)
    snapshot = W.snapshot(model)
    start = StartWeights(path)
    assert start.moved_fraction(model) == 0.0
    with torch.no_grad():
        params = list(model.parameters())
        params[1].view(-1)[:5] += 1.0
        params[-1].view(-1)[-3:] -= 1.0
    got = start.moved_fraction(model)
    assert got == W.moved_fraction(model, snapshot) > 0


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {},
    {"mode": "full"},
    {"mode": "random", "random_match": "edges"},
    {"discovery": "task", "discovery_batches": 2},
    {"mode": "forward"},
    {"mode": "both", "discovery": "task", "discovery_batches": 2},
], ids=["gradient", "full", "random-edges", "task-discovery", "forward", "both-task"])
def test_sharded_run_never_gathers_and_matches_one_process(tmp_path: Path, extra: dict) -> None:
    """2 gloo ranks (tiny Llama: no fused q/k/v), shard='fsdp', DCP checkpoints, no export,
    with `Sharding.gathered` and `Sharding.optimizer_state` raising: the run completes
    (training, two rediscoveries or monitor circuits, evaluations and checkpoints gather
    nothing), and its metrics and final weights equal the unsharded one-process run's
    (metrics within 1e-4, trainable fraction exactly), in every mode that runs without
    gathering (``random_match="parameters"`` / ``"composition"`` gather to size the match);
    in the forward modes also the masked target and the saved means of the last discovery
    (taken from the sharded forwards)."""
    config = {**dict(mode="gradient", top_n=30, steps=4, every_k=2, batch_size=6, lr=1e-2,
                     eval_every=2, save_every=2, eval_examples=6, ema=0.0, weight_decay=0.05,
                     export=False, progress=False), **extra}
    sharded = {**config, "shard": "fsdp", "checkpoint_format": "dcp"}
    dump = tmp_path / "dump"
    dump.mkdir()
    run = tmp_path / "fsdp"
    finish_all(launch_ranks({"out": str(run), "config": sharded, "family": "llama",
                             "forbid_gather": True}, 2, dump), timeout=600)

    single = tiny_model("llama")
    torch.set_num_threads(1)
    ctlens.CircuitTuner(single, toy_task(), TuneConfig(**config)).run(tmp_path / "single")
    got, want = RunDir(run).read_metrics(), RunDir(tmp_path / "single").read_metrics()
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 2, 4]
    for a, b in zip(got, want, strict=True):
        assert a["trainable_fraction"] == b["trainable_fraction"]
        assert a["circuit_edges"] == b["circuit_edges"]
        assert a.keys() == b.keys()
        for key in ("target_metric", "general_loss", "params_moved", "target_metric_masked"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-4, nan_ok=True), (a["step"], key)
        assert a["evals"] == pytest.approx(b["evals"], abs=1e-4)
    assert got[-1]["params_moved"] > 0
    assert (got[-1]["trainable_fraction"] == 1) == (config["mode"] in ("full", "forward"))
    saved = [load_torch(RunDir(r).checkpoint_dir(4) / F.STATE)["means"]
             for r in (run, tmp_path / "single")]
    assert (saved[0] is None) == (saved[1] is None)
    assert saved[1] is not None or config["mode"] not in ("forward", "both")
    if saved[1] is not None:  # the step-2 discovery's means (the forward masks' reference)
        torch.testing.assert_close(saved[0], saved[1], atol=1e-5, rtol=1e-5)

    end = tiny_model("llama")
    S.load_dcp_weights(end, RunDir(run).checkpoint_dir(4))
    expected, final = W.unique_state_dict(single), W.unique_state_dict(end)
    for k, v in final.items():
        torch.testing.assert_close(v.detach(), expected[k].detach(), atol=1e-4, rtol=1e-4)
    assert (RunDir(run).checkpoint_dir(4) / F.WEIGHTS_DCP).is_dir()
