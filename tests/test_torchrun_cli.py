"""The installed command under torchrun: ``torchrun -m ctlens tune --shard fsdp`` on 2 CPU
processes (gloo) runs, exports, and resumes from a checkpoint to the same weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ARGS = ["--model", "zoo:tiny-gpt2", "--task", "agreement-flip", "--shard", "fsdp",
        "--steps", "4", "--save-every", "2", "--eval-every", "2", "--batch-size", "8",
        "--n-examples", "16", "--n-train", "64", "--eval-examples", "16", "--top-n", "30",
        "--no-progress"]


def _torchrun(out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "ctlens", "tune", *ARGS, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_torchrun_fsdp_tune_runs_exports_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _torchrun(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["shard"] == "fsdp" and run.get("sharded") is True
    assert len(run["rank_parameter_bytes"]) == 2
    weights = out / "model" / "model.safetensors"
    tuned = load_file(str(weights))
    assert "transformer.h.0.attn.c_attn.weight" in tuned  # re-fused for export
    # cut the run back to its step-2 checkpoint; the same command resumes and re-exports
    shutil.copy(weights, tmp_path / "first.safetensors")
    shutil.rmtree(out / "checkpoints" / "step_000004")
    shutil.rmtree(out / "model")
    again = _torchrun(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = load_file(str(weights))
    assert tuned.keys() == resumed.keys()
    for name, value in tuned.items():
        assert (resumed[name] - value).abs().max() <= 1e-6, name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]
