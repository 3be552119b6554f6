"""CircuitTuner across processes: SIGKILL then resume, and 2-rank data parallelism (gloo).

Each test takes about 15 s on an idle 2-core machine, most of it subprocesses importing
torch, transformers and TransformerLens (longer when the machine is busy).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tuning_toy import tiny_model, toy_task

import ctlens
from ctlens.tuning import TuneConfig
from ctlens.tuning import weights as W

TOY = Path(__file__).with_name("tuning_toy.py")
CONFIG = dict(mode="gradient", top_n=30, steps=10, every_k=1, ema=0.3, weight_decay=0.05,
              batch_size=6, lr=1e-2, eval_every=1, save_every=2, eval_examples=6,
              progress=False)


def _start(out: Path, config: dict, **extra) -> subprocess.Popen:
    spec = json.dumps({"out": str(out), "config": config, **extra})
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(TOY), spec], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_data_parallel_matches_single_process(tmp_path: Path) -> None:
    config = {**CONFIG, "steps": 3, "eval_every": 3, "save_every": 3, "batch_size": 6,
              "ema": 0.0, "export": False}
    port = _free_port()
    dump = tmp_path / "dump"
    dump.mkdir()
    procs = [
        _start(tmp_path / "ddp", config, ddp={"rank": r, "world": 2, "port": port,
                                              "dump": str(dump)})
        for r in range(2)
    ]
    for proc in procs:
        _finish(proc)
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
    port = _free_port()
    dump = tmp_path / "dump"
    dump.mkdir()
    procs = [
        _start(out, config, ddp={"rank": r, "world": 2, "port": port, "dump": str(dump)})
        for r in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].decode() for proc in procs]
    assert procs[0].returncode != 0 and "RunConflictError" in outputs[0], outputs[0][-2000:]
    assert procs[1].returncode != 0 and "RankFailedError" in outputs[1], outputs[1][-2000:]
    assert "rank 0 failed while preparing the run directory" in outputs[1]
    assert (out / "notes.txt").read_text() == "someone's notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
