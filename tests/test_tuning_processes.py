"""CircuitTuner across processes: SIGKILL then resume, and 2-rank data parallelism (gloo).

Each test takes about 15 s on an idle 2-core machine, most of it subprocesses importing
torch, transformers and TransformerLens (longer when the machine is busy).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tuning_toy import finish_all, launch, launch_ranks, tiny_model, toy_task

import ctlens
from ctlens.tuning import TuneConfig
from ctlens.tuning import weights as W
from ctlens.tuning.enforcement import FORWARD_MODES, GRADIENT_MODES

CONFIG = dict(mode="gradient", top_n=30, steps=10, every_k=1, ema=0.3, weight_decay=0.05,
              batch_size=6, lr=1e-2, eval_every=1, save_every=2, eval_examples=6,
              progress=False)


def _start(out: Path, config: dict, **extra) -> subprocess.Popen:
    return launch({"out": str(out), "config": config, **extra})


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    finish_all([proc], timeout)


def _checkpoints(root: Path) -> list[str]:
    folder = root / "checkpoints"
    return sorted(p.name for p in folder.glob("step_*")) if folder.is_dir() else []


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    reference = _start(tmp_path / "a", CONFIG)
    killed = _start(tmp_path / "b", CONFIG)
    # kill once a checkpoint exists, at a random moment after that (mid-step, mid-write...)
    deadline = time.time() + 240
    while not _checkpoints(tmp_path / "b") and time.time() < deadline:
        assert killed.poll() is None, killed.communicate()[0].decode()[-2000:]
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 0.6))
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    _finish(_start(tmp_path / "b", CONFIG))
    _finish(reference)

    a, b = tmp_path / "a", tmp_path / "b"
    wa = load_file(str(a / "model" / "model.safetensors"))
    wb = load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    steps = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(CONFIG["steps"] + 1))
    for step in steps:
        name = f"circuits/step_{step:06d}.json"
        ca, cb = ctlens.Circuit.load(a / name), ctlens.Circuit.load(b / name)
        assert torch.equal(ca.mask, cb.mask), name
        assert ca.scores is None or torch.equal(ca.scores, cb.scores), name
    assert not [p for p in b.rglob("*") if ".tmp" in p.name], "temporary files left behind"


def test_two_rank_data_parallel_matches_single_process(tmp_path: Path) -> None:
    config = {**CONFIG, "steps": 3, "eval_every": 3, "save_every": 3, "batch_size": 6,
              "ema": 0.0, "export": False}
    dump = tmp_path / "dump"
    dump.mkdir()
    finish_all(launch_ranks({"out": str(tmp_path / "ddp"), "config": config}, 2, dump))
    rank0 = torch.load(dump / "rank0.pt", weights_only=True)
    rank1 = torch.load(dump / "rank1.pt", weights_only=True)

    # single process on the concatenated global batch
    torch.set_num_threads(1)
    model = tiny_model()
    tuner = ctlens.CircuitTuner(model, toy_task(), TuneConfig(**config))
    single = tuner.batch_scores(0).scores
    torch.testing.assert_close(rank0["scores"], single, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rank1["scores"], rank0["scores"], atol=0, rtol=0)
    # both ranks end with identical weights, close to the single-process run
    assert rank0["weights"].keys() == rank1["weights"].keys()
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    tuner.run(tmp_path / "single")
    single_weights = W.unique_state_dict(model)
    for k, v in rank0["weights"].items():
        torch.testing.assert_close(v, single_weights[k].detach(), atol=1e-4, rtol=1e-4)
    doc = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert doc["world_size"] == 2


def test_error_on_rank_zero_stops_every_rank(tmp_path: Path) -> None:
    """Rank 0 refuses the output directory; rank 1 must fail too, not wait forever."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("someone's notes\n")
    config = {**CONFIG, "steps": 2, "export": False}
    dump = tmp_path / "dump"
    dump.mkdir()
    procs = launch_ranks({"out": str(out), "config": config}, 2, dump)
    outputs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
    assert procs[0].returncode != 0 and "RunConflictError" in outputs[0], outputs[0][-2000:]
    assert procs[1].returncode != 0 and "RankFailedError" in outputs[1], outputs[1][-2000:]
    assert "rank 0 failed while preparing the run directory" in outputs[1]
    assert (out / "notes.txt").read_text() == "someone's notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


FSDP_CONFIG = {**CONFIG, "steps": 3, "every_k": 3, "eval_every": 3, "save_every": 3,
               "batch_size": 6, "ema": 0.0, "export": True}


def _fsdp_matches_single(tmp_path: Path, family: str, config: dict) -> None:
    """``config`` sharded on 2 gloo ranks: run.json's per-rank bytes are what the ranks hold,
    the consolidated checkpoint equals the unsharded single-process run within 1e-4, frozen
    slices (circuit modes) are bit-identical, and the export loads as the same weights."""
    from ctlens import run_format as F
    from ctlens.masking.rules import parameter_rules
    from ctlens.tuning.rundir import RunDir

    dump = tmp_path / "dump"
    dump.mkdir()
    run = tmp_path / "fsdp"
    _fsdp_run(run, {**config, "shard": "fsdp"}, 2, dump, family)
    doc = json.loads((run / "run.json").read_text())
    assert doc["sharded"] is True and doc["world_size"] == 2
    held = [torch.load(dump / f"rank{r}.pt", weights_only=True)["local_bytes"] for r in range(2)]
    assert doc["rank_parameter_bytes"] == held  # what FSDP really put on each rank
    start = tiny_model(family)
    total = W.count_real_parameters(start) * 4
    assert sum(doc["rank_parameter_bytes"]) == total  # every real weight once (no fused dup)
    assert max(doc["rank_parameter_bytes"]) < total  # each rank holds a part only

    ckpt = RunDir(run).checkpoint_dir(config["steps"])
    end = tiny_model(family)
    W.load_weights(end, ckpt / F.WEIGHTS)
    if config["mode"] in GRADIENT_MODES:
        circuit = ctlens.Circuit.load(ckpt / F.CIRCUIT)
        names = {id(p): n for n, p in start.named_parameters()}
        ends = dict(end.named_parameters())
        moved = 0
        for rule in parameter_rules(start, circuit):
            before, after = rule.parameter.detach(), ends[names[id(rule.parameter)]].detach()
            frozen = ~rule.trainable
            assert torch.equal(after[frozen], before[frozen]), names[id(rule.parameter)]
            moved += int((after[rule.trainable] != before[rule.trainable]).sum())
        assert moved > 0

    single = tiny_model(family)
    torch.set_num_threads(1)
    ctlens.CircuitTuner(single, toy_task(), TuneConfig(**config)).run(tmp_path / "single")
    expected, got = W.unique_state_dict(single), W.unique_state_dict(end)
    assert expected.keys() == got.keys()
    assert any(not torch.equal(v, start_v) for v, start_v in
               zip(got.values(), W.unique_state_dict(start).values(), strict=True))
    for k, v in got.items():
        torch.testing.assert_close(v.detach(), expected[k].detach(), atol=1e-4, rtol=1e-4)
    exported = load_file(str(run / "model" / "model.safetensors"))  # gathered, re-fused
    for k, v in exported.items():
        torch.testing.assert_close(v, got[k].detach(), atol=0, rtol=0)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    singles = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in singles]
    masked = config["mode"] in FORWARD_MODES
    for got_record, want in zip(records, singles, strict=True):
        assert ("target_metric_masked" in want) == (masked and want["step"] > 0)
        for key in ("params_moved", "trainable_fraction", "target_metric", "general_loss",
                    "target_metric_masked"):
            if key in want:
                assert abs(got_record[key] - want[key]) < 1e-4, (want["step"], key)
        assert got_record["evals"] == pytest.approx(want["evals"], abs=1e-4)


def test_fsdp_two_ranks_match_single_process_and_keep_frozen_slices(tmp_path: Path) -> None:
    """shard='fsdp' on 2 gloo ranks (tiny Llama) equals the unsharded run."""
    _fsdp_matches_single(tmp_path, "llama", FSDP_CONFIG)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {},
    {"mode": "full"},
    {"mode": "random", "random_match": "edges"},
    {"mode": "random", "random_match": "parameters"},
    {"mode": "random", "random_match": "composition"},
    {"discovery": "task", "discovery_batches": 2},
], ids=["gradient", "full", "random-edges", "random-parameters", "random-composition",
        "task-discovery"])
def test_fsdp_gpt2_modes_match_single_process(tmp_path: Path, extra: dict) -> None:
    """Tiny GPT-2 (fused c_attn q/k/v) sharded on 2 ranks equals the unsharded run, in
    every mode shard='fsdp' allows."""
    _fsdp_matches_single(tmp_path, "gpt2", {**FSDP_CONFIG, **extra})


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["forward", "both"])
def test_fsdp_forward_modes_match_single_process(tmp_path: Path, family: str,
                                                 mode: str) -> None:
    """The forward modes sharded on 2 ranks (edge masks on activations, means from the
    sharded forwards) equal the unsharded run, on Llama (no-gather paths) and GPT-2
    (gathered evaluation), masked target included."""
    _fsdp_matches_single(tmp_path, family, {**FSDP_CONFIG, "mode": mode})


def test_fsdp_refusals() -> None:
    """Unsupported shard combinations fail early with a reason."""
    with pytest.raises(ValueError, match="shard='fsdp' supports mode gradient / forward / "
                                         "both / random / full only, not mode='lora'.*peft "
                                         "copy.*Run it unsharded"):
        TuneConfig(shard="fsdp", mode="lora")
    for good in ({"mode": "full"}, {"mode": "random"}, {"discovery": "task"},
                 {"mode": "forward"}, {"mode": "both"}):
        assert TuneConfig(shard="fsdp", **good).shard == "fsdp"
    with pytest.raises(ValueError, match="shard must be one of"):
        TuneConfig(shard="zero3")
    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        ctlens.CircuitTuner(tiny_model("llama"), toy_task(), TuneConfig(shard="fsdp", top_n=30))


def test_cli_shard_needs_torchrun(tmp_path: Path) -> None:
    """``ctlens tune --shard fsdp`` outside torchrun: one error line, exit 2, nothing written."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "ctlens.cli", "tune", "--model", "zoo:tiny-llama",
         "--out", str(tmp_path / "run"), "--shard", "fsdp"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--shard fsdp runs under torchrun" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def _fsdp_run(out: Path, config: dict, world: int, dump: Path, family: str = "llama") -> None:
    finish_all(launch_ranks({"out": str(out), "config": config, "family": family}, world,
                            dump))


def test_fsdp_resume_on_same_and_other_rank_count(tmp_path: Path) -> None:
    """A sharded run cut after its step-2 checkpoint resumes to the uncut run's weights:
    exactly on 2 ranks, within 1e-4 on 1 rank (the reduction order changes)."""
    import shutil

    from ctlens import run_format as F
    from ctlens.tuning.rundir import RunDir

    config = {**CONFIG, "steps": 4, "every_k": 2, "eval_every": 2, "save_every": 2,
              "keep_checkpoints": 2, "batch_size": 6, "ema": 0.0, "export": False,
              "shard": "fsdp"}
    dump = tmp_path / "dump"
    dump.mkdir()
    full = tmp_path / "full"
    _fsdp_run(full, config, 2, dump)
    expected = load_file(str(RunDir(full).checkpoint_dir(4) / F.WEIGHTS))
    for name, world, tol in (("same", 2, 0.0), ("one", 1, 1e-4)):
        cut = tmp_path / name
        shutil.copytree(full, cut)
        shutil.rmtree(RunDir(cut).checkpoint_dir(4))
        _fsdp_run(cut, config, world, dump)
        got = load_file(str(RunDir(cut).checkpoint_dir(4) / F.WEIGHTS))
        assert got.keys() == expected.keys()
        for k in got:
            torch.testing.assert_close(got[k], expected[k], atol=tol, rtol=tol)


@pytest.mark.slow
def test_fsdp_gpt2_checkpoints_resume_across_sharding(tmp_path: Path) -> None:
    """GPT-2's checkpoints have one format, sharded or not: a sharded run cut after its
    step-2 checkpoint resumes unsharded, and an unsharded one resumes sharded on 2 ranks,
    each to the uncut run's step-4 weights within 1e-4 (AdamW state carried across)."""
    import shutil

    from ctlens import run_format as F
    from ctlens.tuning.rundir import RunDir

    plain = {**CONFIG, "steps": 4, "every_k": 2, "eval_every": 2, "save_every": 2,
             "keep_checkpoints": 2, "batch_size": 6, "ema": 0.0, "export": False}
    sharded = {**plain, "shard": "fsdp"}
    dump = tmp_path / "dump"
    dump.mkdir()
    uncut = {"sharded": tmp_path / "sharded", "plain": tmp_path / "plain"}
    _fsdp_run(uncut["sharded"], sharded, 2, dump, "gpt2")
    _finish(_start(uncut["plain"], plain))
    weights = {k: load_file(str(RunDir(v).checkpoint_dir(4) / F.WEIGHTS))
               for k, v in uncut.items()}
    for source, config in (("sharded", plain), ("plain", sharded)):
        cut = tmp_path / f"{source}-cut"
        shutil.copytree(uncut[source], cut)
        shutil.rmtree(RunDir(cut).checkpoint_dir(4))
        doc = json.loads((cut / "run.json").read_text())
        doc["config"] = TuneConfig(**config).to_dict()  # same run, other sharding
        (cut / "run.json").write_text(json.dumps(doc))
        if config.get("shard"):
            _fsdp_run(cut, config, 2, dump, "gpt2")
        else:
            _finish(_start(cut, config))
        got = load_file(str(RunDir(cut).checkpoint_dir(4) / F.WEIGHTS))
        for reference in weights.values():
            assert got.keys() == reference.keys()
            for k in got:
                torch.testing.assert_close(got[k], reference[k], atol=1e-4, rtol=1e-4)
