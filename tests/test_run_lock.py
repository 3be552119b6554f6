"""One process per run directory (issue 26): two ``ctlens tune`` on one ``--out`` (a job
requeued while the first still runs) used to both run and interleave metrics.jsonl.

Every test here uses real processes: the holder is a separate Python process, the second
tuner the real command line or a real tuner.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tuning_toy import launch, tiny_model, toy_task

from ctlens.tuning import TuneConfig
from ctlens.tuning.rundir import RunDir
from ctlens.tuning.runner import CircuitTuner

LOCK_NAME = ".ctlens.lock"  # ctlens.dir_lock.LOCK_NAME (imported where used: see below)
ROOT = Path(__file__).resolve().parent.parent
# child processes import the same ctlens as this one (the checkout under test)
PYTHONPATH = os.pathsep.join(p for p in sys.path if p and Path(p, "ctlens").is_dir())
HOLD = ("import sys; from pathlib import Path; from ctlens.tuning.rundir import RunDir; "
        "lock = RunDir(Path(sys.argv[1])).lock(); print('locked', flush=True); "
        "sys.stdin.read(); lock.release()")


def _holder(out: Path) -> subprocess.Popen:
    """A process that takes ``out``'s run lock and holds it until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH or str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _ctlens(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH or str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ctlens", *args], env=env, text=True,
                          capture_output=True, timeout=300)


def test_second_tune_stops_at_once_naming_the_running_process(tmp_path: Path) -> None:
    """The lock is taken before anything loads: the refusal is the only line on stderr (no
    "loading torch" phase before it). Released on a normal exit (the lock file is gone)
    and on SIGKILL (stale: its pid is dead on this host, so the next process takes it
    over)."""
    out = tmp_path / "run"
    holder = _holder(out)
    second = _ctlens("tune", "--model", "zoo:tiny-gpt2", "--out", str(out))
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctlens tune: error:"), second.stderr
    assert f"in use by a ctlens tuning run (pid {holder.pid}, since" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else written
    holder.communicate("")  # a normal exit releases it
    assert holder.returncode == 0 and not out.exists()  # the lock was all it held

    killed = _holder(out)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == killed.pid  # left behind
    with RunDir(out).lock():  # stale: taken over
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_two_real_tuners_on_one_directory(tmp_path: Path) -> None:
    """A tuner running, a second one with the same flags: the second stops with one line
    and the first finishes alone, its metrics one record per evaluation."""
    out = tmp_path / "run"
    release = tmp_path / "release"  # the first run waits before step 40 until this exists
    config = {"mode": "gradient", "top_n": 30, "steps": 100, "batch_size": 6, "lr": 1e-2,
              "eval_every": 20, "save_every": 50, "eval_examples": 6, "export": False,
              "progress": False}
    first = launch({"out": str(out), "config": config,
                    "hold": {"step": 40, "until": str(release)}})
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").is_file():  # running: its run directory exists
            assert first.poll() is None and time.time() < deadline, first.communicate()[0]
            time.sleep(0.05)
        second = launch({"out": str(out), "config": config})
        text = second.communicate(timeout=300)[0].decode()
        assert second.returncode != 0 and "DirLockedError" in text, text
        assert f"pid {first.pid}" in text
        assert first.poll() is None, first.communicate()[0]  # still held before step 40
    finally:
        release.touch()
    assert first.wait(timeout=300) == 0, first.communicate()[0]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
             .splitlines()]
    assert steps == list(range(0, 101, 20))
    assert not (out / LOCK_NAME).exists()


def test_the_lock_file_decides_where_flock_cannot(tmp_path: Path) -> None:
    """A lock file left by a process that still runs on this host (as on a file system
    without flock) or by any process on another host refuses; one of a dead process on
    this host is stale."""
    from ctlens.dir_lock import LOCK_NAME as NAME
    from ctlens.dir_lock import DirLock, DirLockedError, Owner

    assert NAME == LOCK_NAME
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for owner in (Owner(sleeper.pid, socket.gethostname()), Owner(sleeper.pid, "other")):
            (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": owner.pid,
                                                           "host": owner.host}))
            with pytest.raises(DirLockedError, match=f"pid {owner.pid}") as info:
                DirLock(tmp_path).acquire()
            assert ("delete" in str(info.value)) == (owner.host == "other")
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid,
                                                   "host": socket.gethostname()}))
    with DirLock(tmp_path):  # its pid is gone: stale
        pass


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    """The command line locks --out before loading the model, the tuner locks it again."""
    cfg = TuneConfig(mode="gradient", top_n=30, steps=1, batch_size=6, eval_every=1,
                     save_every=1, eval_examples=6, export=False, progress=False)
    with RunDir(tmp_path / "run").lock():
        CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "run")
        assert (tmp_path / "run" / LOCK_NAME).is_file()  # still held by the outer lock
    assert not (tmp_path / "run" / LOCK_NAME).exists()
