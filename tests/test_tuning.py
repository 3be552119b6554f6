"""CircuitTuner: config validation, weights mapping and export, run directories, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2_module, tiny_llama_module
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from tuning_toy import tiny_model, toy_task

import ctlens
import ctlens.zoo
from ctlens.tuning import CheckpointMismatchError, RunConflictError, TuneConfig
from ctlens.tuning import weights as W
from ctlens.tuning.runner import CircuitTuner

FAST = dict(top_n=30, steps=4, batch_size=6, lr=1e-2, eval_every=2, save_every=2,
            eval_examples=6, progress=False)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("lr", 0.0, "lr must be a positive"),
        ("lr", -1e-3, "lr must be a positive"),
        ("steps", 0, "steps must be a positive integer"),
        ("every_k", 0, "every_k must be a positive integer"),
        ("every_k", -2, "every_k must be a positive integer"),
        ("top_n", 0, "top_n must be a positive integer"),
        ("mode", "magic", "mode must be one of"),
        ("ema", 1.0, "ema must be in"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        TuneConfig(**{field: value})


def test_schedules() -> None:
    linear = TuneConfig(top_n=100, top_n_start=500, top_n_schedule="linear", steps=5)
    assert [linear.top_n_at(t) for t in range(5)] == [500, 400, 300, 200, 100]
    cosine = TuneConfig(top_n=100, top_n_start=500, top_n_schedule="cosine", steps=3)
    assert [cosine.top_n_at(t) for t in range(3)] == [500, 300, 100]
    assert TuneConfig(top_n=7).top_n_at(3) == 7
    assert TuneConfig(lr_schedule="constant").lr_factor(10) == 1.0
    warm = TuneConfig(steps=10, warmup_steps=2, lr_schedule="linear")
    assert warm.lr_factor(0) == 0.5 and warm.lr_factor(2) == 1.0 and warm.lr_factor(9) == 0.0
    cfg = TuneConfig(mode="random", top_n=3)
    assert TuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_top_n_larger_than_graph_is_refused() -> None:
    model = tiny_model()
    n_edges = ctlens.Graph.from_model(model).n_edges
    with pytest.raises(ValueError, match=f"at most {n_edges}"):
        CircuitTuner(model, toy_task(), TuneConfig(top_n=n_edges + 1))


def test_task_without_fields_is_refused() -> None:
    with pytest.raises(TypeError, match="TuneTask"):
        CircuitTuner(tiny_model(), object(), TuneConfig())


# ---------------------------------------------------------------------- batch discovery


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batch_discovery_equals_attribute(family: str) -> None:
    """``"batch"`` discovery (the training forward) is `ctlens.attribute` on that batch.

    Same rows, mean ablation over the batch itself (padding excluded), the same task
    metric: the scores agree to float tolerance, so attribution's oracles cover the
    tuner's default discovery path.
    """
    model, task = tiny_model(family), toy_task()
    tuner = CircuitTuner(model, task, TuneConfig(mode="gradient", batch_size=6, top_n=30))
    step = 3
    rows = tuner._global_rows(step)
    batch = tuner.batch_scores(step).scores
    expected = ctlens.attribute(model, task.train_data[rows], method="eap", ablation="mean",
                                batch_size=None, progress=False).scores
    assert batch.abs().max() > 0
    torch.testing.assert_close(batch, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("family", "groups", "small_graph"),
                         [("gpt2", 4, 256), ("llama", 4, 256), ("gpt2-3", 4, 256),
                          ("gpt2", 4, 0), ("gpt2", 1, 0)])
def test_batch_discovery_equals_attribute_grouped_and_queues(
    family: str, groups: int, small_graph: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neuron groups and the kernel's queue (a small graph's receivers queued a store's
    worth per product, the rest flushed at close; ``small_graph=0``: the default per-hook
    products) leave batch discovery's scores equal to `ctlens.attribute` on the same
    grouped graph, with the tuner's trainable weights. With 3 layers the columns flushed at
    close read a grouped layer (its rows are expanded outside the backward)."""
    from ctlens.tuning import discovery

    monkeypatch.setattr(discovery, "SMALL_GRAPH", small_graph)
    if family == "gpt2-3":
        torch.manual_seed(0)
        config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = ctlens.load_model(GPT2LMHeadModel(config).eval())
    else:
        model = tiny_model(family)
    task = toy_task()
    tuner = CircuitTuner(model, task, TuneConfig(mode="gradient", batch_size=6, top_n=30,
                                                 mlp_groups=groups))
    rows = tuner._global_rows(2)
    batch = tuner.batch_scores(2).scores
    graph = ctlens.Graph.from_model(model, mlp_groups=groups)
    expected = ctlens.attribute(model, task.train_data[rows], method="eap", ablation="mean",
                                batch_size=None, progress=False, graph=graph).scores
    assert batch.shape == expected.shape and batch.abs().max() > 0
    torch.testing.assert_close(batch, expected, atol=1e-6, rtol=1e-4)


def test_batch_discovery_with_loss_metric_equals_attribute() -> None:
    """With ``batch_metric="loss"`` the metric is minus the target-token LM loss."""
    model, task = tiny_model(), toy_task()
    tuner = CircuitTuner(model, task, TuneConfig(mode="gradient", batch_metric="loss",
                                                 batch_size=6, top_n=30))
    rows = tuner._global_rows(1)
    target = task.train_target_mask[rows][:, 1:].float()

    def minus_loss(logits: torch.Tensor, batch: ctlens.TaskData) -> torch.Tensor:
        seq = logits.shape[1]
        logp = logits[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, batch.clean[:, 1:, None])[..., 0]
        per_row = (nll * target[:, : seq - 1]).sum(1)
        return -per_row * len(rows) / target.sum()

    data = ctlens.TaskData(clean=task.train_tokens[rows],
                           attention_mask=task.train_attention_mask[rows], metric=minus_loss)
    expected = ctlens.attribute(model, data, ablation="mean", batch_size=None,
                                progress=False).scores
    torch.testing.assert_close(tuner.batch_scores(1).scores, expected, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------- weights


@pytest.mark.parametrize("build", [tiny_gpt2_module, tiny_llama_module])
def test_hf_mapping_export_and_reload(build, tmp_path: Path) -> None:
    module = build()
    fresh_keys = set(type(module)(module.config).state_dict())
    model = ctlens.load_model(module)
    mapping = W.hf_state_dict(model)
    assert set(mapping) == fresh_keys
    with torch.no_grad():  # make the export differ from the random init
        for tensor in W.unique_state_dict(model).values():
            tensor.add_(0.01)
    out = W.export_hf(model, tmp_path / "export")
    x = torch.randint(1, 50, (2, 7))
    with torch.no_grad():
        expected = model(x)
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=1e-5)
        reloaded = ctlens.load_model(str(out))
        torch.testing.assert_close(reloaded(x), expected, atol=0, rtol=0)


def test_real_parameter_count_dedupes_views_and_ties() -> None:
    model = tiny_model("gpt2")
    listed = sum(p.numel() for p in model.parameters())
    real = W.count_real_parameters(model)
    module = tiny_gpt2_module()
    assert real == sum(p.numel() for p in module.parameters())  # HF dedupes tied weights
    assert listed > real  # q/k/v views of c_attn are listed twice


def test_checkpoint_weights_round_trip_and_mismatch(tmp_path: Path) -> None:
    model = tiny_model()
    W.save_weights(model, tmp_path / "w.safetensors")
    other = tiny_model(seed=5)
    W.load_weights(other, tmp_path / "w.safetensors")
    for a, b in zip(W.real_parameters(model), W.real_parameters(other), strict=True):
        assert torch.equal(a, b)
    small = ctlens.load_model(GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=16, n_head=4, vocab_size=50, n_positions=16)))
    with pytest.raises(CheckpointMismatchError, match="does not match"):
        W.load_weights(small, tmp_path / "w.safetensors")


# ---------------------------------------------------------------------- runs


def test_full_run_writes_the_run_format(tmp_path: Path) -> None:
    model = tiny_model()
    result = CircuitTuner(model, toy_task(), TuneConfig(mode="full", **FAST)).run(tmp_path / "r")
    root = result.out_dir
    doc = json.loads((root / "run.json").read_text())
    assert doc["format"] == "ctlens-run" and doc["version"] == 1
    assert doc["config"]["mode"] == "full" and doc["task"] == "toy"
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    required = {"step", "target_metric", "general_loss", "circuit_edges", "params_moved",
                "evals", "wall_time"}
    for r in records:
        assert required <= set(r)
        assert r["circuit_edges"] == ctlens.Graph.from_model(model).n_edges
        assert (root / r["circuit_file"]).is_file()
        ctlens.Circuit.load(root / r["circuit_file"], model=model)
    assert records[0]["params_moved"] == 0.0 and records[-1]["params_moved"] > 0.5
    assert set(records[0]["evals"]) == {"other"}
    assert records[-1]["target_metric"] > records[0]["target_metric"]
    reloaded = ctlens.load_model(str(root / "model"))
    x = toy_task().train_tokens[:3]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=0, rtol=0)


def test_gradient_mode_moves_only_circuit_parameters(tmp_path: Path) -> None:
    model = tiny_model()
    before = {k: v.detach().clone() for k, v in W.hf_state_dict(model).items()}
    cfg = TuneConfig(mode="gradient", every_k=4, weight_decay=0.1, **FAST)
    result = CircuitTuner(model, toy_task(), cfg).run(tmp_path / "r")
    after = W.hf_state_dict(model)
    # LayerNorms and embeddings never move in gradient mode (DESIGN.md, Masking)
    frozen = [k for k in before if "ln_" in k or "wte" in k or "wpe" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    records = _records(result.out_dir)
    assert 0 < records[-1]["params_moved"] < 1
    assert records[-1]["circuit_edges"] == 30
    circuit = ctlens.Circuit.load(result.out_dir / "circuits" / "step_000004.json")
    assert circuit.n_edges == 30
    # with every_k=4 one circuit is in force: parameters of nodes outside it are unchanged
    sends = circuit.mask.any(1)
    graph = circuit.graph
    for layer in range(graph.spec.n_layers):
        if not sends[graph.mlp_sender(layer)]:
            key = f"transformer.h.{layer}.mlp.c_proj.weight"
            assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("mode", ["random", "forward", "both"])
def test_other_circuit_modes_run(mode: str, tmp_path: Path) -> None:
    # random_match="edges" keeps N edges (the parameter-matched default is tested in
    # test_tuning_options.py)
    extra = {"random_match": "edges"} if mode == "random" else {}
    cfg = TuneConfig(mode=mode, **{**FAST, "steps": 2}, **extra)
    result = CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / mode)
    assert result.metrics["step"] == 2 and result.metrics["circuit_edges"] == 30


def test_task_discovery_with_ema_and_schedule(tmp_path: Path) -> None:
    cfg = TuneConfig(mode="gradient", discovery="task", discovery_batches=2, ema=0.5,
                     top_n_start=60, top_n_schedule="linear",
                     **{**FAST, "steps": 3, "eval_every": 1})
    result = CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "r")
    records = _records(result.out_dir)
    assert [r["circuit_edges"] for r in records[1:]] == [60, 45, 30]


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    original = CircuitTuner._train_step

    def stop(self, t, *args):
        if t >= steps:
            raise KeyboardInterrupt
        return original(self, t, *args)

    monkeypatch.setattr(CircuitTuner, "_train_step", stop)


@pytest.mark.parametrize("mode", ["gradient", "both"])
def test_resume_is_bit_identical(mode: str, tmp_path: Path, monkeypatch) -> None:
    cfg = TuneConfig(mode=mode, every_k=1, ema=0.3, weight_decay=0.05, export=False,
                     **{**FAST, "steps": 5, "eval_every": 1})
    reference = tiny_model()
    CircuitTuner(reference, toy_task(), cfg).run(tmp_path / "a")
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)  # checkpoint at step 2, evaluations up to step 3 on disk
        with pytest.raises(KeyboardInterrupt):
            CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "b")
    assert (tmp_path / "b" / "checkpoints" / "step_000002").is_dir()
    resumed = tiny_model()
    CircuitTuner(resumed, toy_task(), cfg).run(tmp_path / "b")
    for a, b in zip(W.real_parameters(reference), W.real_parameters(resumed), strict=True):
        assert torch.equal(a, b)
    steps_a = [r["step"] for r in _records(tmp_path / "a")]
    steps_b = [r["step"] for r in _records(tmp_path / "b")]
    assert steps_a == steps_b == [0, 1, 2, 3, 4, 5]
    for step in steps_a:
        name = f"circuits/step_{step:06d}.json"
        ca = ctlens.Circuit.load(tmp_path / "a" / name)
        cb = ctlens.Circuit.load(tmp_path / "b" / name)
        assert torch.equal(ca.mask, cb.mask) and torch.equal(ca.scores, cb.scores)


def test_another_runs_directory_is_refused_and_untouched(tmp_path: Path) -> None:
    cfg = TuneConfig(mode="full", **{**FAST, "steps": 2})
    CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "r")
    before = _tree_digest(tmp_path / "r")
    other = TuneConfig(mode="full", **{**FAST, "steps": 2, "lr": 0.5})
    with pytest.raises(RunConflictError, match="lr: 0.01 vs 0.5"):
        CircuitTuner(tiny_model(), toy_task(), other).run(tmp_path / "r")
    assert _tree_digest(tmp_path / "r") == before
    # same run again: resumes at its end, changes nothing but returns its last record
    result = CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "r")
    assert result.metrics["step"] == 2
    # overwrite replaces it
    CircuitTuner(tiny_model(), toy_task(), other).run(tmp_path / "r", overwrite=True)
    assert json.loads((tmp_path / "r/run.json").read_text())["config"]["lr"] == 0.5


def test_non_run_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(RunConflictError, match="holds no ctlens run"):
        CircuitTuner(tiny_model(), toy_task(), TuneConfig(mode="full", **FAST)).run(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_checkpoint_of_another_model_is_refused(tmp_path: Path, monkeypatch) -> None:
    cfg = TuneConfig(mode="full", export=False, **FAST)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "r")
    before = _tree_digest(tmp_path / "r")
    small = ctlens.load_model(GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_embd=16, n_head=4, vocab_size=50, n_positions=16)))
    with pytest.raises(CheckpointMismatchError, match="does not match this model"):
        CircuitTuner(small, toy_task(), cfg).run(tmp_path / "r")
    assert _tree_digest(tmp_path / "r") == before


def test_metric_beta_and_extra_loss(tmp_path: Path) -> None:
    seen = []

    def extra(logits: torch.Tensor, batch: ctlens.TaskData) -> torch.Tensor:
        seen.append(len(batch))
        return logits.float().pow(2).mean() * 1e-3

    cfg = TuneConfig(mode="full", metric_beta=0.5, **{**FAST, "steps": 2})
    CircuitTuner(tiny_model(), toy_task(), cfg, extra_loss=extra).run(tmp_path / "r")
    assert seen == [6, 6]


def test_batch_metric_loss_runs(tmp_path: Path) -> None:
    cfg = TuneConfig(mode="gradient", batch_metric="loss", **{**FAST, "steps": 2})
    result = CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "r")
    assert result.metrics["circuit_edges"] == 30


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_baseline(tmp_path: Path, family: str) -> None:
    """LoRA trains and exports a merged model equal to the tuned one; on Llama its plain HF
    copy needs the rotary buffers the state dict does not carry (they were left on meta)."""
    pytest.importorskip("peft")
    model = tiny_model(family)
    cfg = TuneConfig(mode="lora", lora_rank=2, **{**FAST, "steps": 2})
    result = CircuitTuner(model, toy_task(), cfg).run(tmp_path / "r")
    assert result.metrics["params_moved"] > 0
    saved = load_file(str(result.out_dir / "model" / "model.safetensors"))
    assert not any("lora" in k for k in saved)
    reloaded = ctlens.load_model(str(result.out_dir / "model"))
    x = toy_task().train_tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_cli_options_mirror_the_config() -> None:
    import argparse
    import dataclasses

    from ctlens.cli.tune import add_tune_command, config_from_args

    parser = argparse.ArgumentParser()
    add_tune_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--out", "x", "--mode", "random", "--top-n", "12",
                              "--every-k", "4", "--steps", "9", "--lr", "0.5",
                              "--save-every", "3", "--eval-every", "2", "--seed", "7",
                              "--grad-clip", "none", "--no-export", "--overwrite"])
    cfg = config_from_args(args)
    assert (cfg.mode, cfg.top_n, cfg.every_k, cfg.steps, cfg.lr) == ("random", 12, 4, 9, 0.5)
    assert (cfg.save_every, cfg.eval_every, cfg.seed, cfg.grad_clip) == (3, 2, 7, None)
    assert cfg.export is False and args.overwrite
    defaults = config_from_args(parser.parse_args(["tune", "--out", "x"]))
    assert dataclasses.asdict(defaults) == dataclasses.asdict(TuneConfig())
    with pytest.raises(ValueError, match="lr must be a positive"):
        config_from_args(parser.parse_args(["tune", "--out", "x", "--lr", "0"]))


@pytest.mark.slow
@pytest.mark.skipif(not ctlens.zoo.names(), reason="no zoo model shipped yet")
def test_cli_tune_on_a_zoo_model_resumes(tmp_path: Path, capsys) -> None:
    from ctlens.cli import main

    name = "zoo:" + ctlens.zoo.names()[0]
    argv = ["tune", "--model", name, "--task", "agreement-flip", "--mode", "gradient",
            "--top-n", "50", "--steps", "2", "--batch-size", "4", "--eval-every", "2",
            "--save-every", "1", "--eval-examples", "8", "--n", "16", "--n-train", "16",
            "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["step"] == 2 and first["circuit_edges"] == 50
    assert main(argv) == 0  # the same command again resumes (here: already complete)
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == first
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_run_format_is_one_pure_python_module(tmp_path: Path) -> None:
    """Writer and reader share `ctlens.run_format`; it imports nothing heavy."""
    import ast

    import ctlens.run_format as F
    from ctlens.viz.run import read_run

    tree = ast.parse(Path(F.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "json", "re", "pathlib", "typing"}
    assert F.parse_step(F.step_name(42)) == 42 and F.parse_step("step_42") is None
    assert F.parse_step(F.snapshot_name(7), ".json") == 7
    cfg = TuneConfig(mode="gradient", **{**FAST, "steps": 2, "export": False})
    root = CircuitTuner(tiny_model(), toy_task(), cfg).run(tmp_path / "r").out_dir
    run = read_run(root)
    assert run.steps == [0, 2] and run.info["format"] == F.FORMAT
    with pytest.raises(F.RunFormatError, match="version 9"):
        F.check_run_doc({**run.info, "version": 9}, "run.json")
