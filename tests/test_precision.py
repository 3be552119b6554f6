"""``TuneConfig.precision``: the training forward under autocast, fp32 weights and scores.

CPU autocast supports bfloat16 and float16 in this torch, so both paths (and fp16's loss
scaler) run here; tests/test_gpu.py repeats the bf16 check on CUDA.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from tuning_toy import tiny_model, toy_task

import ctlens
from ctlens.tuning import RunConflictError, TuneConfig
from ctlens.tuning import weights as W
from ctlens.tuning.precision import INITIAL_SCALE
from ctlens.tuning.runner import CircuitTuner

FAST = dict(top_n=30, steps=4, every_k=4, batch_size=6, lr=1e-2, eval_every=2, save_every=2,
            eval_examples=6, progress=False, export=False)


def _tune(precision: str, out: Path) -> tuple[torch.Tensor, dict, dict, CircuitTuner]:
    """Step 0's batch scores, the weights before and after a run, and the tuner."""
    model = tiny_model()
    tuner = CircuitTuner(model, toy_task(), TuneConfig(precision=precision, **FAST))
    scores = tuner.batch_scores(0).scores
    before = {k: v.detach().clone() for k, v in W.hf_state_dict(model).items()}
    tuner.run(out)
    after = {k: v.detach().clone() for k, v in W.hf_state_dict(model).items()}
    return scores, before, after, tuner


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return _tune("fp32", tmp_path_factory.mktemp("fp32") / "r")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_run_is_exact_where_it_must_be_and_close_to_fp32(
    precision: str, fp32_run: tuple, tmp_path: Path
) -> None:
    """Measured on this toy (4 steps, AdamW, lr 1e-2): bf16 scores differ from fp32 by
    1.2 % (relative norm) and the weight updates by 4.2 %; fp16 by 0.12 % and 1.3 %; the
    top-30 edges are the same. The bounds below leave about 3x room. fp16's scores would be
    65536x too large if discovery's loss scale were not divided back out."""
    scores32, before32, after32, _ = fp32_run
    scores, before, after, tuner = _tune(precision, tmp_path / "r")
    assert scores.dtype == torch.float32 and after["transformer.h.0.attn.c_attn.weight"].dtype \
        == torch.float32  # fp32 scores, fp32 master weights
    assert float((scores - scores32).norm() / scores32.norm()) < 0.05
    top = set(scores32.abs().flatten().topk(30).indices.tolist())
    assert len(top & set(scores.abs().flatten().topk(30).indices.tolist())) >= 27
    update32 = torch.cat([(after32[k] - before32[k]).flatten() for k in after32])
    update = torch.cat([(after[k] - before[k]).flatten() for k in after])
    assert update.abs().max() > 0
    assert float((update - update32).norm() / update32.norm()) < 0.15
    # the gradient restriction stays exact: frozen slices bit-identical
    frozen = [k for k in before if "ln_" in k or "wte" in k or "wpe" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    circuit = ctlens.Circuit.load(tmp_path / "r" / "circuits" / "step_000004.json")
    assert circuit.scores is not None and circuit.scores.dtype == torch.float32
    sends = circuit.mask.any(1)
    for layer in range(circuit.graph.spec.n_layers):
        if not sends[circuit.graph.mlp_sender(layer)]:
            key = f"transformer.h.{layer}.mlp.c_proj.weight"
            assert torch.equal(before[key], after[key]), key
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["config"]["precision"] == precision
    assert (tuner.precision.scaler is not None) == (precision == "fp16")


@pytest.mark.parametrize("mode", ["forward", "both", "full"])
def test_bf16_runs_in_every_mode(mode: str, tmp_path: Path) -> None:
    """The forward masks' custom backward takes the autocast dtype's gradient."""
    cfg = TuneConfig(mode=mode, precision="bf16", **{**FAST, "steps": 2, "every_k": 1})
    model = tiny_model()
    result = CircuitTuner(model, toy_task(), cfg).run(tmp_path / mode)
    assert result.metrics["step"] == 2
    assert all(bool(torch.isfinite(p).all()) for p in W.real_parameters(model))
    assert torch.isfinite(torch.tensor(result.metrics["general_loss"]))


def test_precision_is_part_of_what_a_run_computes(tmp_path: Path) -> None:
    """A run resumes only at its own precision; runs written before the option read fp32."""
    cfg = TuneConfig(**{**FAST, "steps": 2})
    CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "r")
    bf16 = TuneConfig(precision="bf16", **{**FAST, "steps": 2})
    with pytest.raises(RunConflictError, match="precision: 'fp32' vs 'bf16'"):
        CircuitTuner(tiny_model(), toy_task(), bf16).run(tmp_path / "r")
    assert "precision" not in cfg.semantic_dict()  # older run.json files resume unchanged
    assert bf16.semantic_dict()["precision"] == "bf16"
    old = {k: v for k, v in cfg.to_dict().items() if k != "precision"}
    assert TuneConfig.from_dict(old).precision == "fp32"


def test_bad_precision_and_low_precision_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', 'fp16'"):
        TuneConfig(precision="fp8")
    model = tiny_model().to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 master weights.*bfloat16"):
        CircuitTuner(model, toy_task(), TuneConfig(precision="bf16", **FAST))


def test_cli_has_precision() -> None:
    from ctlens.cli.tune import add_tune_command, config_from_args

    parser = argparse.ArgumentParser()
    add_tune_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--out", "x", "--precision", "bf16"])
    assert config_from_args(args).precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["tune", "--out", "x", "--precision", "half"])


def test_bf16_composes_with_fsdp(tmp_path: Path) -> None:
    """bf16 autocast under shard='fsdp' (1 gloo rank, in process, a file store): the
    checkpoint equals the unsharded bf16 run's weights within 1e-5 (measured: equal)."""
    import torch.distributed as dist

    from ctlens import run_format as F
    from ctlens.tuning.rundir import RunDir

    cfg = dict(precision="bf16", **{**FAST, "steps": 3, "every_k": 3, "eval_every": 3,
                                    "save_every": 3})
    reference = tiny_model("llama")
    CircuitTuner(reference, toy_task(), TuneConfig(**cfg)).run(tmp_path / "single")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        CircuitTuner(tiny_model("llama"), toy_task(), TuneConfig(shard="fsdp", **cfg)).run(
            tmp_path / "fsdp"
        )
    finally:
        dist.destroy_process_group()
    end = tiny_model("llama")
    W.load_weights(end, RunDir(tmp_path / "fsdp").checkpoint_dir(3) / F.WEIGHTS)
    expected, got = W.unique_state_dict(reference), W.unique_state_dict(end)
    for key, value in got.items():
        torch.testing.assert_close(value.detach(), expected[key].detach(), atol=1e-5,
                                   rtol=1e-5)


def test_fp16_resume_keeps_the_loss_scale(tmp_path: Path) -> None:
    """A resumed fp16 run continues with the scale its checkpoint saved: a run whose scaler
    grows every step (growth interval 1), cut back to its step-2 checkpoint and resumed,
    ends with the uncut run's scale and bit-identical weights; the old behaviour (a fresh
    scaler on resume) ends one growth short."""
    def run(out: Path) -> CircuitTuner:
        tuner = CircuitTuner(tiny_model(), toy_task(), TuneConfig(precision="fp16", **FAST))
        tuner.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4,
                                                      growth_interval=1)
        tuner.run(out)
        return tuner

    whole = run(tmp_path / "whole")
    saved = torch.load(tmp_path / "whole" / "checkpoints" / "step_000002" / "state.pt",
                       weights_only=False)
    assert saved["scaler"]["scale"] == 2.0**6  # grown once per step: the test can tell
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "checkpoints" / "step_000004")
    resumed = run(cut)
    assert resumed.precision.scaler.get_scale() == whole.precision.scaler.get_scale() == 2.0**8
    for a, b in zip(W.real_parameters(whole.model), W.real_parameters(resumed.model),
                    strict=True):
        assert torch.equal(a, b)


def _zoo_run(name: str, precision: str, out: Path, steps: int) -> CircuitTuner:
    """A ``precision`` gradient run with the default ``"batch"`` discovery on zoo model
    ``name`` (the task ``ctlens tune`` defaults to)."""
    model = ctlens.load_model(f"zoo:{name}")
    task = ctlens.tasks.load("agreement-flip", n=16, n_train=64, n_general=8,
                             tokenizer=getattr(model, "tokenizer", None))
    config = TuneConfig(precision=precision, top_n=0.02, steps=steps, batch_size=8,
                        eval_every=steps, save_every=steps, eval_examples=8,
                        general_examples=8, progress=False, export=False)
    tuner = CircuitTuner(model, task, config, model_name=name)
    tuner.run(out)
    return tuner


@pytest.mark.parametrize("name", ctlens.zoo.names())
def test_fp16_batch_discovery_skips_no_step_on_a_zoo_model(
    name: str, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """The loss scale (2^16) made discovery's metric backward overflow float16 at step 1 on
    every zoo model ("edge scores contain NaN or inf"): discovery's own backward now runs
    unscaled, and no step is skipped (the 2^16 scale also overflowed mini-gpt2's first
    gradients: the first scale is `INITIAL_SCALE`; 60-step runs: the slow test below)."""
    tuner = _zoo_run(name, "fp16", tmp_path / "r", steps=3)
    assert tuner.precision.skipped == 0
    assert tuner.precision.scaler.get_scale() == INITIAL_SCALE  # no gradient step backed off
    assert not [w for w in recwarn if "fp16" in str(w.message)]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert records[-1]["step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ctlens.zoo.names())
def test_fp16_sixty_steps_skip_none(name: str, tmp_path: Path) -> None:
    tuner = _zoo_run(name, "fp16", tmp_path / "r", steps=60)
    assert tuner.precision.skipped == 0


@pytest.mark.parametrize("batch_metric", ["task", "loss"])
def test_fp16_steps_whose_scores_overflow_are_skipped_and_counted(
    batch_metric: str, tmp_path: Path
) -> None:
    """A real overflow (scores made infinite here on the second step) skips that step's
    update, keeps the circuit in force, backs the scale off when the overflowing backward
    was the scaled one, and ends the run with one warning naming fp16 and the count. At
    fp32 the same scores still stop the run (not fp16's overflow: nothing to skip)."""
    def tuner_of(precision: str) -> CircuitTuner:
        config = TuneConfig(precision=precision, batch_metric=batch_metric,
                            **{**FAST, "every_k": 1})
        tuner = CircuitTuner(tiny_model(), toy_task(), config)
        scores_of = tuner.discovery.batch_scores
        calls = []

        def overflow_on_the_second(*args: object) -> tuple:
            scores, means, done = scores_of(*args)
            calls.append(1)
            return (scores * float("inf") if len(calls) == 2 else scores), means, done

        tuner.discovery.batch_scores = overflow_on_the_second  # type: ignore[method-assign]
        return tuner

    tuner = tuner_of("fp16")
    circuits: list = []
    enter = tuner.discovery.select
    tuner.discovery.select = lambda s, t: circuits.append(t) or enter(s, t)  # type: ignore
    with pytest.warns(UserWarning, match=r"precision='fp16': 1 of the 4 steps run were "
                                         r"skipped because float16 overflowed"):
        tuner.run(tmp_path / "fp16")
    assert tuner.precision.skipped == 1 and circuits == [0, 2, 3]  # step 1 selected nothing
    assert tuner.precision.scaler.get_scale() == INITIAL_SCALE / (2 if batch_metric == "loss"
                                                                  else 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        tuner_of("fp32").run(tmp_path / "fp32")
