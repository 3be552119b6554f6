"""The CUDA path: each check runs the same work on the CPU and on a GPU and compares.

Every test here is marked ``gpu`` and skipped where CUDA is not available (``pytest -m gpu``
selects them). They compare fp32 results on CUDA with the CPU's within float tolerance
(different kernels and reduction orders, no TF32: torch keeps fp32 matmuls exact by default),
and check what must be exact (frozen slices) exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_task, tiny_gpt2_module, tiny_llama_module
from tuning_toy import toy_task

import ctlens
from ctlens.tuning import TuneConfig
from ctlens.tuning import weights as W
from ctlens.tuning.runner import CircuitTuner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BUILD = {"gpt2": tiny_gpt2_module, "llama": tiny_llama_module}
FAST = dict(top_n=30, steps=2, every_k=2, batch_size=6, lr=1e-2, eval_every=2, save_every=2,
            eval_examples=6, progress=False, export=False)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within 1e-3 relative, 1e-4 of the largest entry absolute."""
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_cuda_attribution_matches_cpu(family: str, method: str) -> None:
    data = random_task()
    cpu = ctlens.attribute(ctlens.load_model(BUILD[family]()), data, method=method,
                           progress=False)
    model = ctlens.load_model(BUILD[family](), device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    gpu = ctlens.attribute(model, data, method=method, progress=False)
    assert gpu.scores.device.type == "cpu" and gpu.scores.dtype == torch.float32
    _close(gpu.scores, cpu.scores)
    # a budget that splits the batch (64 KiB; on the CPU it moves the scores by < 1e-6
    # relative): the same scores on CUDA
    tight = ctlens.attribute(model, data, method=method, progress=False, max_memory=2**16)
    assert tight.scores.dtype == torch.float32
    _close(tight.scores, cpu.scores)
    half = ctlens.attribute(
        ctlens.load_model(BUILD[family](), device="cuda", dtype=torch.bfloat16), data,
        method=method, progress=False,
    )
    assert half.scores.dtype == torch.float32 and torch.isfinite(half.scores).all()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edge_mask_and_faithfulness_on_cuda_match_cpu(family: str) -> None:
    data = random_task()
    cpu_model = ctlens.load_model(BUILD[family]())
    gpu_model = ctlens.load_model(BUILD[family](), device="cuda")
    circuit = ctlens.Circuit.from_scores(ctlens.attribute(cpu_model, data, progress=False),
                                         top_n=20)
    for ablation in ("corrupt", "mean"):
        cpu = ctlens.faithfulness(cpu_model, data, circuit, ablation=ablation)
        gpu = ctlens.faithfulness(gpu_model, data, circuit, ablation=ablation)
        for field in ("faithfulness", "metric_circuit", "metric_full", "metric_empty"):
            assert getattr(gpu, field) == pytest.approx(getattr(cpu, field), rel=1e-3,
                                                        abs=1e-4), (ablation, field)
    with torch.no_grad():
        with ctlens.edge_mask(cpu_model, circuit, ablation="mean", reference=data):
            expected = cpu_model(data.clean)
        with ctlens.edge_mask(gpu_model, circuit, ablation="mean", reference=data):
            got = gpu_model(data.clean.cuda())
        plain = gpu_model(data.clean.cuda())
    assert got.device.type == "cuda"
    _close(got, expected)
    assert not torch.allclose(got, plain)  # the mask changed the function


def _tune(
    device: str, family: str, out: Path, **config: object
) -> tuple[dict, dict, CircuitTuner, torch.Tensor]:
    """Weights before and after a short run of the toy task on ``device``, its tuner, and
    its step-0 batch scores (taken before the run)."""
    model = ctlens.load_model(BUILD[family](), device=device)
    before = {k: v.detach().cpu().clone() for k, v in W.hf_state_dict(model).items()}
    tuner = CircuitTuner(model, toy_task(), TuneConfig(**{**FAST, **config}))
    scores = tuner.batch_scores(0).scores
    tuner.run(out)
    after = {k: v.detach().cpu().clone() for k, v in W.hf_state_dict(model).items()}
    return before, after, tuner, scores


def _frozen_keys(state: dict) -> list[str]:
    """Norms, embeddings and unembedding: frozen in gradient mode (DESIGN.md, Masking)."""
    words = ("norm", "ln_", "embed", "wte", "wpe", "lm_head")
    return [k for k in state if any(w in k for w in words)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tuning_step_on_cuda_matches_cpu(family: str, tmp_path: Path) -> None:
    _, cpu_after, _, cpu_scores = _tune("cpu", family, tmp_path / "cpu")
    before, gpu_after, _, gpu_scores = _tune("cuda", family, tmp_path / "gpu")
    assert gpu_scores.dtype == torch.float32
    _close(gpu_scores, cpu_scores)
    for key, value in cpu_after.items():
        torch.testing.assert_close(gpu_after[key], value, atol=1e-4, rtol=1e-4, msg=key)
    # the same circuit was discovered on both devices
    a = ctlens.Circuit.load(tmp_path / "cpu" / "circuits" / "step_000002.json")
    b = ctlens.Circuit.load(tmp_path / "gpu" / "circuits" / "step_000002.json")
    assert torch.equal(a.mask, b.mask)
    frozen = _frozen_keys(before)
    assert frozen and all(torch.equal(before[k], gpu_after[k]) for k in frozen)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda(precision: str, tmp_path: Path) -> None:
    """Autocast on CUDA: fp32 master weights and scores, frozen slices exact, close to fp32
    (the CPU bounds of tests/test_precision.py)."""
    before, fp32_after, _, scores32 = _tune("cuda", "llama", tmp_path / "fp32")
    _, after, mixed, scores = _tune("cuda", "llama", tmp_path / precision, precision=precision)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert scores.dtype == torch.float32
    assert float((scores - scores32).norm() / scores32.norm()) < 0.05
    update32 = torch.cat([(fp32_after[k] - before[k]).flatten() for k in before])
    update = torch.cat([(after[k] - before[k]).flatten() for k in before])
    assert update.abs().max() > 0
    assert float((update - update32).norm() / update32.norm()) < 0.15
    frozen = _frozen_keys(before)
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    doc = json.loads((tmp_path / precision / "run.json").read_text())
    assert doc["config"]["precision"] == precision
    assert (mixed.precision.scaler is not None) == (precision == "fp16")


def test_fsdp_on_one_cuda_device_matches_unsharded(tmp_path: Path) -> None:
    """shard='fsdp' with NCCL, world size 1 (a file store, no port): the run equals the
    unsharded CUDA run within 1e-4 and records itself as sharded. (FSDP on main shards the
    Llama family; GPT-2's fused q/k/v views are refused.)"""
    import torch.distributed as dist

    from ctlens import run_format as F
    from ctlens.tuning.rundir import RunDir

    config = dict(mode="gradient", discovery="batch", steps=3, every_k=3, eval_every=3,
                  save_every=3)
    _, expected, _, _ = _tune("cuda", "llama", tmp_path / "single", **config)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = ctlens.load_model(tiny_llama_module(), device="cuda")
        CircuitTuner(model, toy_task(), TuneConfig(**{**FAST, **config}, shard="fsdp")).run(
            tmp_path / "fsdp"
        )
    finally:
        dist.destroy_process_group()
    doc = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert doc["sharded"] is True and doc["world_size"] == 1
    end = ctlens.load_model(tiny_llama_module())
    W.load_weights(end, RunDir(tmp_path / "fsdp").checkpoint_dir(3) / F.WEIGHTS)
    got = {k: v.detach() for k, v in W.hf_state_dict(end).items()}
    assert got.keys() == expected.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], atol=1e-4, rtol=1e-4, msg=key)
