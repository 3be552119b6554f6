"""Model cards for the zoo, rendered from the shipped files (so the numbers are measured).

``python scripts/zoo_card.py NAME [NAME ...] --out docs/zoo`` writes ``docs/zoo/NAME.md``:
architecture, training data mixture, recipe, final loss and wall time (from
``training.json``), accuracy on every task, and the previous-token / induction heads found
from attention patterns.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctlens.tasks.corpus import segment
from ctlens.zoo import load_hf, model_dir, training_record
from ctlens.zoo.configs import spec
from ctlens.zoo.evaluate import THRESHOLDS, induction_heads

EXAMPLE_SEED = 7
PATH_EXAMPLES = 32

_METRICS: tuple[tuple[str, str], ...] = (
    ("agreement_acc", "agreement: accuracy (correct verb form preferred)"),
    ("ioi_acc", "ioi: accuracy (indirect object preferred over subject)"),
    (
        "pronoun_stereotype_acc",
        "pronoun: stereotyped occupations whose mean she-he has the stereotype's sign",
    ),
    ("pronoun_acc", "pronoun: examples preferring the stereotyped pronoun"),
    ("pronoun_mean_abs_diff", "pronoun: mean abs(she - he) logit difference"),
    ("induction_logprob", "induction: mean log-prob of repeated tokens"),
    ("induction_chance", "induction: chance log-prob (-log of the word count)"),
    ("general_loss", "general corpus: LM loss (nats/token)"),
)


def _architecture_rows(name: str, cfg: dict[str, Any]) -> list[tuple[str, str]]:
    if spec(name).architecture == "gpt2":
        return [
            ("type", "GPT2LMHeadModel (pre-LayerNorm, learned absolute positions, GELU MLP)"),
            ("layers", str(cfg["n_layer"])),
            ("d_model", str(cfg["n_embd"])),
            ("heads", f"{cfg['n_head']} (head dim {cfg['n_embd'] // cfg['n_head']})"),
            ("MLP width", str(cfg["n_inner"])),
            ("context", f"{cfg['n_positions']} positions"),
            ("embeddings", "tied input/output"),
        ]
    return [
        ("type", "LlamaForCausalLM (RMSNorm, rotary positions, SwiGLU MLP)"),
        ("layers", str(cfg["num_hidden_layers"])),
        ("d_model", str(cfg["hidden_size"])),
        (
            "heads",
            f"{cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} KV heads "
            f"(grouped-query attention, head dim {cfg['head_dim']})",
        ),
        ("MLP width", f"{cfg['intermediate_size']} (SwiGLU)"),
        ("context", f"trained on {cfg['max_position_embeddings']} tokens"),
        ("embeddings", "untied"),
    ]


def induction_path_ranks(
    source: str | Path, heads: dict[str, tuple[int, int, float]]
) -> dict[str, Any]:
    """Ranks (by |EAP-IG score|) of the previous-token -> induction-key path edges.

    ``source``: anything :func:`ctlens.load_model` takes (``"zoo:NAME"``, a model directory).
    """
    import math

    from ctlens.attribution import attribute
    from ctlens.model import load_model
    from ctlens.tasks import generators
    from ctlens.tasks.bundle import to_taskdata

    bridge = load_model(source)
    data = to_taskdata(generators.induction(PATH_EXAMPLES, 2025))
    scores = attribute(bridge, data, method="eap-ig", ablation="corrupt", progress=False)
    n_edges = scores.graph.n_edges
    order = {(s, r): i + 1 for i, (s, r, _) in enumerate(scores.top(n_edges))}
    il, ih, _ = heads["induction"]
    cfg = bridge.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    key = f"a{il}.g{ih // (cfg.n_heads // n_kv)}.k" if n_kv < cfg.n_heads else f"a{il}.h{ih}.k"
    top5 = math.ceil(0.05 * n_edges)
    edges: list[tuple[str, str]] = []
    paths: list[str] = []
    for pl, ph, _ in heads["previous_heads"]:
        prev = f"a{pl}.h{ph}"
        edges.append((prev, key))
        if order[(prev, key)] <= top5:
            paths.append(f"{prev} -> {key}")
        for mlp in (f"m{m}" for m in range(pl, il)):
            edges += [(prev, mlp), (mlp, key)]
            if max(order[(prev, mlp)], order[(mlp, key)]) <= top5:
                paths.append(f"{prev} -> {mlp} -> {key}")
    return {
        "n_edges": n_edges,
        "top5": top5,
        "ranks": {f"{s} -> {r}": order[(s, r)] for s, r in dict.fromkeys(edges)},
        "paths": paths,
    }


def _reproduction_lines(record: dict[str, Any]) -> list[str]:
    """A sentence on a recorded retraining check, if ``training.json`` holds one."""
    rep = record.get("reproduction")
    if not rep:
        return []
    same = "bit-identical weights" if rep.get("identical_weights") else "different weights"
    return [
        f"Checked on {rep['date']} with `scripts/zoo_check.py`: `{rep['command']}` gave "
        f"{same} and {'the same' if rep.get('identical_eval') else 'a different'} "
        "evaluation.",
        "",
    ]


def _seed_lines(record: dict[str, Any]) -> list[str]:
    """Results of recorded runs with other seeds (``training.json`` key ``seed_checks``)."""
    checks = record.get("seed_checks") or []
    lines = []
    for check in checks:
        ev = check["eval"]
        lines.append(
            f"- seed {check['seed']}: agreement {ev['agreement_acc']:.3f}, ioi "
            f"{ev['ioi_acc']:.3f}, pronoun (occupations) {ev['pronoun_stereotype_acc']:.3f}, "
            f"induction log-prob {ev['induction_logprob']:.3f}, final loss "
            f"{check['final_loss']:.4f}"
            + (
                f"; induction path in the top 5 %: `{check['induction_paths_top5'][0]}`"
                if check.get("induction_paths_top5")
                else ""
            )
        )
    if lines:
        lines = ["The same recipe with other seeds (same evaluation):", "", *lines, ""]
    return lines


def render(name: str) -> str:
    """The markdown model card of a shipped zoo model."""
    import json

    record = training_record(name)
    path = model_dir(name)
    cfg = json.loads((path / "config.json").read_text())
    model, _ = load_hf(name)
    heads = induction_heads(model)
    lines = [
        *_architecture_lines(name, cfg, record, (path / "model.safetensors").stat().st_size),
        *_data_lines(record["recipe"]),
        *_recipe_lines(name, record),
        *_accuracy_lines(record["eval"]),
        *_induction_lines(heads, induction_path_ranks(f"zoo:{name}", heads)),
        *_history_lines(record["history"]),
    ]
    return "\n".join(lines) + "\n"


def _architecture_lines(
    name: str, cfg: dict[str, Any], record: dict[str, Any], weight_bytes: int
) -> list[str]:
    """Title, description, how to load, and the architecture table."""
    return [
        f"# `{name}`",
        "",
        spec(name).description,
        "A ctlens zoo model trained from scratch on the synthetic task language "
        "(`ctlens.tasks`); every number below is measured on the shipped weights.",
        "",
        "```python",
        f'model = ctlens.load_model("zoo:{name}")          # TransformerBridge',
        f'hf_model, tokenizer = ctlens.zoo.load_hf("{name}")  # plain HF module',
        "```",
        "",
        "## Architecture",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in _architecture_rows(name, cfg)],
        f"| vocabulary | {cfg['vocab_size']} words (word-level, `<bos>` prepended) |",
        f"| parameters | {record['n_parameters']:,} |",
        f"| weights | `model.safetensors`, fp32, {weight_bytes / 1e6:.1f} MB |",
        "| dropout | none |",
        "",
    ]


def _data_lines(recipe: dict[str, Any]) -> list[str]:
    """The training mixture, with one seeded example segment per family."""
    import random

    rng = random.Random(EXAMPLE_SEED)
    return [
        "## Training data",
        "",
        f"Packed rows of {recipe['context']} tokens (`<bos>` first), each filled with "
        "segments of one family drawn from this mixture (`ctlens.tasks.corpus`):",
        "",
        "| family | weight | example segment |",
        "| --- | --- | --- |",
        *[
            f"| {family} | {weight} | `{' '.join(segment(family, rng))}` |"
            for family, weight in recipe["mixture"].items()
        ],
        "",
        "Stereotyped occupations are followed by their stereotyped pronoun 90 % of the time "
        "in this corpus; neutral occupations 50 %.",
        "",
    ]


def _recipe_lines(name: str, record: dict[str, Any]) -> list[str]:
    """The optimiser recipe, final loss, wall time and how the weights were reproduced."""
    recipe = record["recipe"]
    return [
        "## Recipe",
        "",
        f"AdamW (betas {tuple(recipe['betas'])}, weight decay {recipe['weight_decay']} on "
        f"matrices), lr {recipe['lr']} with {recipe['warmup']} warm-up steps and cosine decay "
        f"to {recipe['min_lr_ratio']} x lr, gradient clipping {recipe['grad_clip']}, batch "
        f"{recipe['batch_size']} x {recipe['context']} tokens, **{recipe['steps']} steps**, "
        f"seed {recipe['seed']}, {record['threads']} torch thread(s), torch {record['torch']}.",
        "",
        f"- final training loss (mean of the last 100 steps): **{record['final_loss']:.4f}**",
        f"- wall time: **{record['train_seconds'] / 60:.1f} min** "
        f"({record['cpu_seconds'] / 60:.1f} CPU-min) with {record['threads']} torch threads on "
        f"a 2-core {record['machine']} machine (the quick evaluations included)",
        "",
        f"Reproduce: `ctlens zoo train {name} --out DIR` (the recipe fixes the seed and the "
        "thread count; the slow test "
        "`tests/test_zoo.py::test_retraining_reproduces_shipped_accuracies` does this and "
        "compares the accuracies).",
        "",
        *_reproduction_lines(record),
        *_seed_lines(record),
    ]


def _accuracy_lines(ev: dict[str, Any]) -> list[str]:
    """Every task metric of the shipped evaluation against its threshold."""
    lines = [
        "## Accuracy on every task",
        "",
        f"Fresh samples from `ctlens.zoo.evaluate.evaluate(model, n={ev['n']}, "
        f"seed={ev['seed']})`:",
        "",
        "| metric | value | required |",
        "| --- | --- | --- |",
    ]
    for key, label in _METRICS:
        bound = THRESHOLDS.get(key)
        lines.append(f"| {label} | {ev[key]:.3f} | {'>= ' + str(bound) if bound else ''} |")
    return lines


def _induction_lines(heads: dict[str, Any], circuit: dict[str, Any]) -> list[str]:
    """The induction and previous-token heads, and the ranks of the edges joining them."""
    il, ih, iscore = heads["induction"]
    return [
        "",
        "## Induction circuit",
        "",
        "From attention patterns on repeated random sequences "
        "(`ctlens.zoo.evaluate.induction_heads`):",
        "",
        f"- induction head **a{il}.h{ih}**: {iscore:.2f} of its attention on the token after "
        "the current token's earlier occurrence",
        *[
            f"- previous-token head **a{pl}.h{ph}**: {score:.2f} of its attention on the "
            "previous token"
            for pl, ph, score in heads["previous_heads"]
        ],
        "",
        f"Edge ranks by |EAP-IG score| (5 steps, corrupt ablation: the first copy replaced by "
        f"fresh words) on {PATH_EXAMPLES} induction prompts, out of {circuit['n_edges']} edges "
        f"(top 5 % = {circuit['top5']}):",
        "",
        *[f"- `{edge}`: rank {rank}" for edge, rank in circuit["ranks"].items()],
        "",
        "Paths from a previous-token head to the induction head's key input within the top "
        f"5 %: {', '.join(f'`{p}`' for p in circuit['paths']) or 'none'}. "
        "`tests/test_zoo.py::test_induction_circuit` requires at least one (directly or "
        "through an MLP).",
        "",
    ]


def _history_lines(history: list[dict[str, Any]]) -> list[str]:
    """The quick evaluations recorded during training, one table row each."""
    return [
        "## Training history",
        "",
        "Quick evaluations (64 samples per task) during training:",
        "",
        "| step | loss | agreement | ioi | pronoun (occupations) | induction log-prob |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {h['step']} | {h['loss']:.3f} | {h['agreement_acc']:.2f} | {h['ioi_acc']:.2f} "
            f"| {h['pronoun_stereotype_acc']:.2f} | {h['induction_logprob']:.2f} |"
            for h in history
        ],
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the cards of the given zoo models (default: all shipped) to ``--out``."""
    from ctlens.zoo import names

    parser = argparse.ArgumentParser(prog="python scripts/zoo_card.py", description=__doc__)
    parser.add_argument("names", nargs="*", help="zoo models (default: all shipped)")
    parser.add_argument("--out", default="docs/zoo", help="output folder (default docs/zoo)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names or names():
        (out / f"{name}.md").write_text(render(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
