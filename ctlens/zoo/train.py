"""Train a zoo model from scratch on the synthetic corpus (plain torch on the HF module).

``python -m ctlens.zoo.train NAME [--seed S] [--steps N] [--out DIR]`` or
``ctlens zoo train NAME``. Deterministic for a given seed and thread count: the weights are
initialised from ``torch.manual_seed(seed)`` and batches come from ``random.Random(seed)``
through :func:`ctlens.tasks.corpus.sample_rows`. The output directory gets ``config.json``,
``model.safetensors``, ``tokenizer.json`` and ``training.json`` (recipe, final loss,
accuracies on every task, wall time, a short history).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ctlens.files import atomic_write_text
from ctlens.tasks.corpus import sample_rows
from ctlens.tasks.tokenizer import PAD, TOKENIZER_PATH, word_to_id, wrap
from ctlens.zoo.configs import Recipe, spec
from ctlens.zoo.evaluate import evaluate

MODELS_DIR: Path = Path(__file__).with_name("models")
"""Where shipped zoo models live (``models/NAME/``)."""

EVAL_SEED = 12345
"""Seed of the final evaluation recorded in ``training.json`` (tests use other seeds)."""


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


def train(
    name: str,
    seed: int | None = None,
    steps: int | None = None,
    out: Path | str | None = None,
    threads: int | None = None,
    progress: bool = True,
    eval_n: int = 256,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Train zoo model ``name``; save it to ``out`` (default: the shipped location).

    Returns the model (eval mode) and the ``training.json`` record. ``seed``, ``steps`` and
    ``threads`` (torch CPU threads) override the spec's recipe; the same recipe gives
    bit-identical weights on the same machine and torch build. The caller's thread count and
    torch's global RNG are restored afterwards.
    """
    model_spec = spec(name)
    recipe = model_spec.recipe
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=seed)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        recipe = dataclasses.replace(recipe, steps=steps)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        recipe = dataclasses.replace(recipe, threads=threads)
    out_dir = Path(out) if out is not None else MODELS_DIR / name
    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(recipe.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = model_spec.build()
        return _fit(model, model_spec.architecture, name, recipe, out_dir, progress, eval_n)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    model: PreTrainedModel,
    architecture: str,
    name: str,
    recipe: Recipe,
    out_dir: Path,
    progress: bool,
    eval_n: int,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The training loop of :func:`train` (deterministic given the model and recipe)."""
    model.train()
    data_rng = random.Random(recipe.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
        betas=recipe.betas,
    )
    pad = word_to_id()[PAD]
    history: list[dict[str, float]] = []
    losses: list[float] = []
    start = time.perf_counter()
    start_cpu = time.process_time()
    bar = tqdm(range(recipe.steps), desc=f"train {name}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        ids = sample_rows(data_rng, recipe.batch_size, recipe.context, recipe.mixture)
        labels = ids.masked_fill(ids == pad, -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            quick = evaluate(model, n=64, seed=recipe.seed + step)
            entry = {
                "step": step + 1,
                "loss": sum(losses[-50:]) / len(losses[-50:]),
                "seconds": round(time.perf_counter() - start, 1),
                **{k: round(v, 4) for k, v in quick.items() if k != "induction_chance"},
            }
            history.append(entry)
            bar.set_postfix(
                loss=f"{entry['loss']:.3f}",
                agr=f"{quick['agreement_acc']:.2f}",
                ioi=f"{quick['ioi_acc']:.2f}",
                pro=f"{quick['pronoun_stereotype_acc']:.2f}",
                ind=f"{quick['induction_logprob']:.2f}",
            )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - start_cpu
    model.eval()
    metrics = evaluate(model, n=eval_n, seed=EVAL_SEED)
    record: dict[str, Any] = {
        "name": name,
        "architecture": architecture,
        "recipe": {**dataclasses.asdict(recipe), "mixture": dict(recipe.mixture)},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "train_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "eval": {"n": eval_n, "seed": EVAL_SEED, **metrics},
        "history": history,
    }
    save(model, out_dir, record)
    return model, record


def save(model: PreTrainedModel, out_dir: Path, record: dict[str, Any]) -> None:
    """Write the HF directory (config + safetensors), the tokenizer and ``training.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    generation = out_dir / "generation_config.json"
    if generation.exists():
        generation.unlink()
    shutil.copyfile(TOKENIZER_PATH, out_dir / "tokenizer.json")
    write_tokenizer_config(out_dir)
    write_record(out_dir, record)


def write_record(out_dir: Path, record: dict[str, Any]) -> None:
    """Write ``training.json`` (the record `ctlens.zoo.training_record` reads) atomically."""
    atomic_write_text(out_dir / "training.json", json.dumps(record, indent=1) + "\n")


def write_tokenizer_config(out_dir: Path) -> None:
    """Write ``tokenizer_config.json`` beside ``tokenizer.json``.

    Without it, ``AutoTokenizer`` (and so ``ctlens.load_model(out_dir)``) guesses a tokenizer
    from the model type (GPT-2's BPE for tiny-gpt2) instead of the shipped word-level one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        wrap(out_dir / "tokenizer.json").save_pretrained(tmp)
        shutil.copyfile(Path(tmp) / "tokenizer_config.json", out_dir / "tokenizer_config.json")

