"""Tests of ctlens.zoo: shipped models load offline, meet the task thresholds, and contain
an induction circuit that attribution finds; training is seeded and the CLI works."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ctlens
from ctlens import zoo
from ctlens.cli.zoo import add_zoo_command
from ctlens.tasks import generators, to_taskdata
from ctlens.tasks.language import vocabulary
from ctlens.zoo.evaluate import THRESHOLDS, evaluate, induction_heads, passes
from ctlens.zoo.train import lr_at, train

SHIPPED = ("mini-gpt2", "tiny-gpt2", "tiny-llama")
FRESH_SEED = 2024  # differs from training.json's evaluation seed (12345)


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    model, tok = zoo.load_hf(request.param)
    return request.param, model, tok


def test_names_and_unknown_name():
    assert set(SHIPPED) <= set(zoo.names())
    with pytest.raises(zoo.UnknownModelError) as err:
        zoo.load_hf("tiny-gpt3")
    message = str(err.value)
    assert "tiny-gpt3" in message and all(name in message for name in SHIPPED)
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="available: mini-gpt2, tiny-gpt2, tiny-llama"):
        ctlens.zoo.spec("nope")


def test_shipped_files_small_fp32_and_offline(shipped):
    name, model, tok = shipped
    path = zoo.model_dir(name)
    assert {p.name for p in path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training.json",
    }
    size = (path / "model.safetensors").stat().st_size
    assert 0.3e6 < size < 10e6, f"{name}: {size} bytes"
    assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.float32}
    assert not model.training
    assert not any(m.training for m in model.modules())
    cfg = model.config
    drops = [getattr(cfg, k, 0.0) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
    assert all(d == 0.0 for d in drops) and getattr(cfg, "attention_dropout", 0.0) == 0.0
    assert cfg.vocab_size == len(vocabulary())
    assert tok.get_vocab() == zoo.tokenizer().get_vocab()
    assert tok("the nurse said that")["input_ids"][0] == tok.bos_token_id
    # deterministic in eval mode (no dropout)
    ids = tok(["when mary and john went to the store , john gave a drink to"], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits, model(**ids).logits
    assert torch.equal(a, b)


def test_architectures():
    gpt2, _ = zoo.load_hf("tiny-gpt2")
    llama, _ = zoo.load_hf("tiny-llama")
    assert type(gpt2).__name__ == "GPT2LMHeadModel"
    assert type(llama).__name__ == "LlamaForCausalLM"
    cfg = llama.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.hidden_act == "silu" and type(llama.model.norm).__name__ == "LlamaRMSNorm"
    assert type(gpt2.transformer.ln_f).__name__ == "LayerNorm"
    assert gpt2.transformer.wpe.weight.shape[0] == gpt2.config.n_positions


def test_mini_gpt2_has_gpt2_smalls_proportions():
    """MLPs of 4 x d_model with GELU hold about two thirds of the non-embedding parameters
    (GPT-2 small: 56.6M of 84.9M, 0.667), in at least 6 layers of at least 8 heads."""
    model, _ = zoo.load_hf("mini-gpt2")
    cfg = model.config
    assert cfg.n_inner == 4 * cfg.n_embd and cfg.activation_function.startswith("gelu")
    assert cfg.n_layer >= 6 and cfg.n_head >= 8
    named = dict(model.transformer.named_parameters())
    embedding = sum(p.numel() for n, p in named.items() if n.startswith(("wte", "wpe")))
    mlp = sum(p.numel() for n, p in named.items() if ".mlp." in n)
    share = mlp / (sum(p.numel() for p in named.values()) - embedding)
    assert 0.64 < share < 0.69, share
    tiny, _ = zoo.load_hf("tiny-gpt2")
    tiny_named = dict(tiny.transformer.named_parameters())
    tiny_mlp = sum(p.numel() for n, p in tiny_named.items() if ".mlp." in n)
    tiny_rest = sum(p.numel() for n, p in tiny_named.items() if not n.startswith(("wte", "wpe")))
    assert tiny_mlp / tiny_rest < 0.51  # what the third model adds: realistic proportions


def test_thresholds_on_fresh_samples(shipped):
    name, model, _ = shipped
    metrics = evaluate(model, n=192, seed=FRESH_SEED)
    failed = {k: metrics[k] for k, ok in passes(metrics).items() if not ok}
    assert not failed, f"{name} misses {failed} (thresholds {THRESHOLDS})"
    assert metrics["induction_logprob"] > metrics["induction_chance"] + 3


def test_training_record_is_honest(shipped):
    """training.json's accuracies are what the shipped weights really score."""
    name, model, _ = shipped
    record = zoo.training_record(name)
    assert record["name"] == name and record["recipe"]["steps"] > 0
    assert record["train_seconds"] > 0 and math.isfinite(record["final_loss"])
    small = evaluate(model, n=record["eval"]["n"], seed=record["eval"]["seed"])
    for key in ("agreement_acc", "ioi_acc", "pronoun_stereotype_acc", "induction_logprob"):
        assert small[key] == pytest.approx(record["eval"][key], abs=1e-4), key


def test_bridge_logits_match_hf(shipped):
    name, model, tok = shipped
    bridge = ctlens.load_model(f"zoo:{name}")
    ids = tok(["the keys near the old cabinet"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = bridge(ids)
    got = got.logits if hasattr(got, "logits") else got
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_model_directory_loads_with_the_word_level_tokenizer(shipped):
    """A zoo directory loaded as a plain HF directory keeps the shipped tokenizer."""
    name, _, tok = shipped
    bridge = ctlens.load_model(zoo.model_dir(name))
    text = "the keys near the old cabinet"
    assert bridge.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    assert bridge.tokenizer.pad_token_id == tok.pad_token_id


# ---------------------------------------------------------------- induction circuit


def test_induction_circuit(shipped):
    """Heads from attention patterns; then a path previous-token head -> induction key in the
    top 5 % of attributed edges, directly or through an MLP."""
    name, model, _ = shipped
    heads = induction_heads(model, seed=FRESH_SEED)
    layer, head, ind_score = heads["induction"]
    assert ind_score > 0.5, heads
    assert heads["previous_heads"], f"{name}: no previous-token head ({heads})"

    bridge = ctlens.load_model(f"zoo:{name}")
    data = to_taskdata(generators.induction(32, FRESH_SEED + 1))
    # EAP-IG: the induction log-prob is saturated (about -0.03), where plain EAP's linear
    # estimate under-rates the paths that produce it
    scores = ctlens.attribute(bridge, data, method="eap-ig", ablation="corrupt", progress=False)
    k = math.ceil(0.05 * scores.graph.n_edges)
    top = {(s, r) for s, r, _ in scores.top(k)}
    cfg = model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", n_heads)
    key = f"a{layer}.g{head // (n_heads // n_kv)}.k" if n_kv < n_heads else f"a{layer}.h{head}.k"
    assert key in scores.graph.receivers
    paths = []
    for p_layer, p_head, _ in heads["previous_heads"]:
        prev = f"a{p_layer}.h{p_head}"
        if (prev, key) in top:
            paths.append(f"{prev} -> {key}")
        paths += [
            f"{prev} -> m{m} -> {key}"
            for m in range(p_layer, layer)
            if (prev, f"m{m}") in top and (f"m{m}", key) in top
        ]
    assert paths, f"{name}: no previous-token head reaches {key} in the top {k} edges ({heads})"


# ---------------------------------------------------------------- training and CLI


def test_lr_schedule():
    recipe = zoo.spec("tiny-llama").recipe
    assert lr_at(0, recipe) == pytest.approx(recipe.lr / recipe.warmup)
    assert lr_at(recipe.warmup, recipe) == pytest.approx(recipe.lr)
    assert lr_at(recipe.steps, recipe) == pytest.approx(recipe.lr * recipe.min_lr_ratio)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("name", SHIPPED)
def test_training_is_seeded(tmp_path, name):
    _, rec_a = train(name, seed=3, steps=3, out=tmp_path / "a", progress=False, eval_n=8)
    train(name, seed=3, steps=3, out=tmp_path / "b", progress=False, eval_n=8)
    train(name, seed=4, steps=3, out=tmp_path / "c", progress=False, eval_n=8)
    a, b, c = (_weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["recipe"]["seed"] == 3 and record["recipe"]["steps"] == 3
    assert record["threads"] == record["recipe"]["threads"] == zoo.spec(name).recipe.threads
    assert record == json.loads(json.dumps(rec_a))
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        zoo.model_dir(name) / "tokenizer.json"
    ).read_text()


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(zoo.UnknownModelError, match="available"):
        train("tiny-bert", steps=1, out=tmp_path)
    with pytest.raises(ValueError, match="steps must be positive"):
        train("tiny-gpt2", steps=0, out=tmp_path)
    with pytest.raises(ValueError, match="threads must be positive"):
        train("tiny-gpt2", threads=0, out=tmp_path)
    assert not any(tmp_path.iterdir())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctlens")
    add_zoo_command(parser.add_subparsers(dest="command"))
    return parser


def test_cli(tmp_path, capsys):
    args = _parser().parse_args(["zoo", "list"])
    assert args.func(args) == 0
    listing = capsys.readouterr().out
    assert all(name in listing and "shipped" in listing for name in SHIPPED)
    out = tmp_path / "m"
    args = _parser().parse_args(
        ["zoo", "train", "tiny-gpt2", "--seed", "1", "--steps", "2", "--out", str(out)]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and "ioi_acc" in summary
    model_loaded = type(zoo.load_hf("tiny-gpt2")[0]).from_pretrained(out)
    assert model_loaded.config.n_layer == 3
    args = _parser().parse_args(["zoo", "train", "nonexistent", "--steps", "1"])
    assert args.func(args) == 2
    assert "available" in capsys.readouterr().err


@pytest.mark.parametrize("name", [
    # mini-gpt2's retraining (13-18 minutes on 2 cores) is `long`: CI's slow stage, which
    # must end within the hour, leaves it out; `pytest -m long` runs it
    pytest.param(name, marks=pytest.mark.long if name == "mini-gpt2" else pytest.mark.slow)
    for name in SHIPPED
])
def test_retraining_reproduces_shipped_accuracies(tmp_path, name):
    """Retrain with the shipped recipe (seed, steps, threads): the same accuracies.

    About 8 minutes per tiny model and 13-18 for mini-gpt2 on 2 idle cores. Accuracies, not
    bits, are compared: the bits also depend on the CPU's kernels (``scripts/zoo_check.py``
    records a bit-level check).
    """
    record = zoo.training_record(name)
    recipe = record["recipe"]
    _, new = train(
        name,
        seed=recipe["seed"],
        steps=recipe["steps"],
        out=tmp_path / name,
        threads=record["threads"],
        progress=False,
    )
    for key in ("agreement_acc", "ioi_acc", "pronoun_stereotype_acc"):
        assert new["eval"][key] == pytest.approx(record["eval"][key], abs=0.02), key
    assert new["eval"]["induction_logprob"] == pytest.approx(
        record["eval"]["induction_logprob"], abs=0.05
    )
    assert all(passes(new["eval"]).values())


def test_task_bundles_score_as_expected_on_shipped_model():
    """The Task bundles' TaskData are wired right: a trained model scores them as it should."""
    from ctlens import tasks
    from ctlens.data import TaskData

    model, _ = zoo.load_hf("tiny-llama")

    def values(data: TaskData, corrupt: bool = False) -> torch.Tensor:
        ids = data.corrupt if corrupt else data.clean
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=data.attention_mask.long()).logits
        return data.metric_values(logits)

    flip = tasks.load("agreement-flip", n=64, n_train=16, n_general=8)
    assert (values(flip.evals["agreement"]) > 0).float().mean() > 0.95
    assert (values(flip.evals["agreement-flip"]) < 0).float().mean() > 0.95
    assert values(flip.discovery).mean() < 0 < values(flip.discovery, corrupt=True).mean()
    ioi = tasks.load("ioi", n=64, n_train=16, n_general=8)
    assert values(ioi.discovery).mean() > 2 > values(ioi.discovery, corrupt=True).mean()
    induction = tasks.load("induction", n=32, n_train=16, n_general=8)
    assert values(induction.discovery).mean() > -1 > -3 > values(induction.discovery, True).mean()
    general = tasks.load("general", n=16, n_train=16, n_general=16)
    assert -2.5 < values(general.evals["general"]).mean() < -1.0

    # training rows: the model gives its own verb form far more probability than the flip's
    def target_logp(task: tasks.Task) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=task.train_tokens).logits
        ids = task.train_tokens[:, 1:, None]
        logp = logits[:, :-1].log_softmax(-1).gather(2, ids)[..., 0]
        return logp[task.train_target_mask[:, 1:]]

    same = dict(n=8, n_train=64, n_general=8, seed=3)
    own = target_logp(tasks.load("agreement", **same))
    flipped = target_logp(tasks.load("agreement-flip", **same))
    assert (own - flipped > 2).float().mean() > 0.95
