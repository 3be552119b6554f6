"""Benchmark: circuit-tuning speed, and the paper's controlled experiment on a zoo model.

``speed``: time per optimizer step of circuit-tuning (mode ``gradient``, discovery
``"batch"`` with mean ablation, every K = 1 and K = 8 steps) divided by the time of a full
fine-tuning step on the same model and batches (targets: <= 1.8 at K = 1, <= 1.2 at K = 8).
Models: the zoo architectures (random init, built locally) and, with ``--gpt2-small``, the
GPT-2-small shape. Timings interleave the configurations over several rounds and take
medians, because the machine is shared. Writes the ``circuit-tuning`` section of
docs/benchmarks.md.

``experiment``: the paper's subject-verb *disagreement* experiment (task ``agreement-flip``)
on a trained zoo model: circuit-tuning (gradient), circuit-tuning (forward), full
fine-tuning, a random subgraph of the same size, and LoRA, same steps, each over a small
learning-rate grid; then a sweep over K in {1, 4, 16} and three circuit sizes N with
gradient circuit-tuning. Every run is a normal run directory under ``--out`` (re-running the
script resumes or reuses them). Writes docs/experiments.md with whatever the numbers are.

Run::

    python benchmarks/circuit_tuning.py speed [--gpt2-small] [--steps 10] [--rounds 3]
    python benchmarks/circuit_tuning.py experiment [--model zoo:tiny-gpt2] [--steps 60] \
        [--part main|sweep|all]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import ctlens
import ctlens.tasks
import ctlens.zoo

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "docs" / "experiments.md"


# ============================================================================ speed


def _gpt2_small() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def _speed_task(model: Any, n: int, seq: int, seed: int = 0) -> Any:
    """Random next-token rows (the target: the last token) for models of any vocabulary."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tuning_toy import ToyTask

    vocab = model.cfg.d_vocab
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, seq), generator=gen)
    attention = torch.ones_like(tokens, dtype=torch.bool)
    target = torch.zeros_like(attention)
    target[:, -1] = True
    data = ctlens.TaskData(clean=tokens, correct=tokens[:, -1], wrong=(tokens[:, -1] + 1) % vocab,
                           positions=torch.full((n,), seq - 2))
    return ToyTask(discovery=data, train_tokens=tokens, train_target_mask=target,
                   train_attention_mask=attention, train_data=data, evals={"t": data},
                   target_eval="t")


def speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    models: list[tuple[str, Any, int, int]] = []
    for name in ("tiny-gpt2", "tiny-llama"):
        torch.manual_seed(0)
        models.append((f"{name} (zoo shape)", ctlens.zoo.spec(name).build().eval(), 16, 24))
    if args.gpt2_small:
        models.append(("GPT-2 small shape", _gpt2_small(), 8, 32))
    configs = {
        "full": dict(mode="full"),
        "K=1": dict(mode="gradient", every_k=1),
        "K=8": dict(mode="gradient", every_k=8),
        "K=1, loss metric": dict(mode="gradient", every_k=1, batch_metric="loss"),
    }
    rows = []
    for label, module, batch, seq in models:
        model = ctlens.load_model(module)
        task = _speed_task(model, 8 * batch, seq)
        n_edges = ctlens.Graph.from_model(model).n_edges
        top_n = max(1, n_edges // 20)
        times: dict[str, list[float]] = {k: [] for k in configs}
        for _ in range(args.rounds):
            for key, extra in configs.items():
                cfg = ctlens.TuneConfig(steps=10_000, batch_size=batch, lr=1e-5, top_n=top_n,
                                        progress=False, **extra)
                tuner = ctlens.CircuitTuner(model, task, cfg)
                times[key] += tuner.time_steps(args.steps, warmup=1)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append([label, f"{batch}x{seq}", f"{top_n}/{n_edges}",
                     f"{med['full'] * 1e3:.0f}",
                     *(f"{med[k] * 1e3:.0f} ({med[k] / med['full']:.2f})"
                       for k in ("K=1", "K=8", "K=1, loss metric"))])
        print(rows[-1], flush=True)
    header = ["model", "batch x seq", "N / edges", "full step (ms)",
              "K=1 ms (ratio)", "K=8 ms (ratio)", "K=1, batch_metric=loss ms (ratio)"]
    text = (
        "## Circuit-tuning speed\n\n"
        "`python benchmarks/circuit_tuning.py speed"
        f"{' --gpt2-small' if args.gpt2_small else ''}`: time per optimizer step of "
        "circuit-tuning (`mode=\"gradient\"`, discovery `\"batch\"`: EAP with the batch's own "
        "per-position mean as the ablation, reusing the training forward) divided by a full "
        "fine-tuning step on the same model and batches. Targets: ratio <= 1.8 at K = 1 and "
        "<= 1.2 at K = 8. The K = 1 step adds one backward of the task metric to the receiver "
        "inputs (no parameter gradients), the score products and the selection; between "
        "rediscoveries (K = 8) frozen parameters get no gradient at all, so those steps are "
        "cheaper than full fine-tuning. `batch_metric=\"loss\"` differentiates minus the "
        "training loss instead, sharing the optimizer's backward. Random-init weights (speed "
        f"does not depend on training); median of {args.rounds} interleaved rounds of "
        f"{args.steps} steps; torch threads {args.threads}; {platform.processor() or 'cpu'}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs when it finished.\n\n"
        + markdown_table(header, rows)
    )
    if not args.no_report:
        write_section("circuit-tuning", text)
    print(text)


# ============================================================================ experiment


def _run(model_name: str, task: Any, cfg: ctlens.TuneConfig, out: Path) -> None:
    """One run; resumed, or skipped when ``out`` already holds it complete."""
    done = out / "metrics.jsonl"
    if done.is_file() and any(json.loads(x)["step"] == cfg.steps
                              for x in done.read_text().splitlines()):
        return
    model = ctlens.load_model(model_name)
    ctlens.CircuitTuner(model, task, cfg, model_name=model_name).run(out)


def _collect(out: Path) -> dict[str, dict[str, Any]]:
    """Every complete run under ``out``: first/last metrics records and its config."""
    results: dict[str, dict[str, Any]] = {}
    for run in sorted(out.glob("*/run.json")):
        doc = json.loads(run.read_text())
        cfg = ctlens.TuneConfig.from_dict(doc["config"])
        try:  # another process may be writing this run right now
            lines = (run.parent / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(x) for x in lines]
        except (OSError, json.JSONDecodeError):
            continue
        if not records or records[-1]["step"] != cfg.steps:
            continue
        results[run.parent.name] = {"first": records[0], "last": records[-1], "config": cfg,
                                    "records": records}
    return results


def _model_label(model: str) -> str:
    """``zoo:NAME`` with the sha256 prefix of its shipped weights (other models as given)."""
    if not model.startswith("zoo:"):
        return model
    import hashlib

    weights = ctlens.zoo.model_dir(model[4:]) / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    return f"{model} (model.safetensors sha256 {digest})"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def experiment(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    probe = ctlens.load_model(args.model)
    n_edges = ctlens.Graph.from_model(probe).n_edges
    task = ctlens.tasks.load("agreement-flip", n=args.n, n_train=args.n_train, seed=0)
    sizes = [max(1, round(f * n_edges)) for f in (0.05, 0.15, 0.40)]
    base = dict(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                save_every=args.steps, eval_examples=args.n, progress=False, seed=0)
    lrs = [float(x) for x in args.lrs.split(",")]

    def record(key: str, cfg: ctlens.TuneConfig) -> None:
        _run(args.model, task, cfg, out / key)
        last = _collect(out).get(key, {}).get("last", {})
        print(key, json.dumps({k: last.get(k) for k in
                               ("target_metric", "general_loss", "params_moved")}), flush=True)
        _write(args, n_edges, sizes)

    if args.part in ("main", "all"):
        for mode in args.modes.split(","):
            if mode == "lora":
                try:
                    import peft  # noqa: F401
                except ImportError:
                    continue
            for lr in lrs:
                cfg = ctlens.TuneConfig(mode=mode, lr=lr, top_n=sizes[1], every_k=1, **base)
                record(f"{mode}-lr{lr:g}", cfg)
    if args.part in ("sweep", "all"):
        for k in (int(x) for x in args.ks.split(",")):
            for n in sizes:
                cfg = ctlens.TuneConfig(mode="gradient", lr=args.sweep_lr, top_n=n, every_k=k,
                                        **base)
                record(f"sweep-k{k}-n{n}", cfg)
    _write(args, n_edges, sizes)


MATCH = 0.9


def _matched(res: dict[str, Any]) -> str:
    """Step and general LM loss at the first evaluation with target accuracy >= MATCH."""
    for r in res["records"]:
        if (r.get("target_accuracy") or 0.0) >= MATCH:
            return f"step {r['step']}: {r['general_loss']:.3f}"
    return "not reached"


def _row(key: str, res: dict[str, Any]) -> list[str]:
    first, last = res["first"], res["last"]
    cfg = res["config"]
    other = last.get("evals_accuracy", {})
    others = ", ".join(f"{k} {v:.2f}" for k, v in sorted(other.items()))
    induction = last["evals"].get("induction")
    if induction is not None:
        others += f", induction logp {induction:.2f}"
    return [
        cfg.mode, f"{cfg.lr:g}",
        f"{first['target_metric']:+.2f} -> {last['target_metric']:+.2f}",
        _fmt(last.get("target_accuracy")),
        f"{first['general_loss']:.3f} -> {last['general_loss']:.3f}",
        _matched(res),
        others,
        f"{last['params_moved']:.3f}",
        _fmt(last.get("trainable_fraction"), 3),
        f"{last['wall_time']:.0f}",
    ]


def _circuit_section(out: Path, key: str, steps: int) -> str:
    root = out / key
    before = ctlens.Circuit.load(root / "circuits" / "step_000000.json")
    after = ctlens.Circuit.load(root / "circuits" / f"step_{steps:06d}.json")
    top_before = _top_edges(before)
    top_after = _top_edges(after)
    added = sorted(set(after.nodes) - set(before.nodes))
    removed = sorted(set(before.nodes) - set(after.nodes))
    lines = [
        f"Run `{key}`: the circuit at step 0 (task circuit of the original model, EAP with mean "
        f"ablation on the discovery pairs, {before.n_edges} edges) and the circuit in force at "
        f"the last step ({after.n_edges} edges, discovered on the last training batch).",
        "",
        f"- edge Jaccard {before.edge_jaccard(after):.2f}, node Jaccard "
        f"{before.node_jaccard(after):.2f}",
        f"- nodes that joined: {', '.join(added) or 'none'}",
        f"- nodes that left: {', '.join(removed) or 'none'}",
        "",
        markdown_table(["rank", "top edges before (score)", "top edges after (score)"],
                       [[i + 1, a, b] for i, (a, b) in enumerate(zip(top_before, top_after,
                                                                       strict=False))]),
    ]
    return "\n".join(lines)


def _top_edges(circuit: ctlens.Circuit, k: int = 10) -> list[str]:
    if circuit.scores is None:
        return [f"{s} -> {r}" for s, r in circuit.edges[:k]]
    scores = circuit.scores.abs() * circuit.mask
    flat = scores.flatten().topk(k).indices.tolist()
    n_r = circuit.graph.n_receivers
    out = []
    for i in flat:
        s, r = circuit.graph.senders[i // n_r], circuit.graph.receivers[i % n_r]
        out.append(f"{s} -> {r} ({float(circuit.scores[i // n_r, i % n_r]):+.3f})")
    return out


def _write(args: argparse.Namespace, n_edges: int, sizes: list[int]) -> None:
    results = _collect(Path(args.out))
    order = {m: i for i, m in enumerate(("gradient", "forward", "full", "random", "lora"))}
    main_keys = sorted((k for k in results if not k.startswith("sweep-")),
                       key=lambda k: (order.get(results[k]["config"].mode, 9),
                                      results[k]["config"].lr))
    header = ["mode", "lr", "target: logit(wrong) - logit(right), start -> end",
              "target acc (flipped)", "general LM loss, start -> end",
              f"general LM loss when target acc first >= {MATCH}",
              "other tasks' accuracy at the end", "params moved", "trainable at the end",
              "wall s"]
    rows = [_row(k, results[k]) for k in main_keys]
    sweep = []
    for k in (1, 4, 16):
        for n in sizes:
            res = results.get(f"sweep-k{k}-n{n}")
            if res is None:
                continue
            last = res["last"]
            sweep.append([k, n, f"{last['target_metric']:+.2f}",
                          _fmt(last.get("target_accuracy")),
                          f"{last['general_loss']:.3f}", _matched(res),
                          f"{last['params_moved']:.3f}",
                          _fmt(last.get("trainable_fraction"), 3),
                          f"{last['wall_time']:.0f}"])
    first = results[main_keys[0]]["first"] if main_keys else None
    parts = [
        "# Experiments: the paper's controlled experiment, reproduced small",
        "",
        "Written by `python benchmarks/circuit_tuning.py experiment` (re-run it to refresh; "
        "the numbers below are whatever that run measured, on a shared 2-core CPU). "
        f"This page: `--steps {args.steps} --eval-every {getattr(args, 'eval_every', '?')} "
        f"--n {args.n} --lrs {getattr(args, 'lrs', '?')} --sweep-lr "
        f"{getattr(args, 'sweep_lr', '?')}`; runs are independent and deterministic, so the "
        "grid may be split over processes with `--part`, `--modes` and `--ks`.",
        "",
        "**Setup.** Model `" + (args.label or _model_label(args.model)) + f"` ({n_edges} valid "
        "edges). Task "
        "`agreement-flip` (the paper's subject-verb *disagreement*: train the model to "
        "produce the wrong verb number; the target metric is logit(wrong form) - "
        "logit(correct form) on held-out prompts, and its accuracy the fraction of prompts "
        "where the wrong form now wins). "
        f"{args.steps} optimizer steps of batch {args.batch_size} (AdamW, constant lr, grad "
        f"clip 1.0) for every run; evaluation sets of {args.n} examples; general LM loss on "
        "128 held-out rows of the general corpus. Circuit runs select the top "
        f"N = {sizes[1]} edges ({sizes[1] / n_edges:.0%} of the graph) every step (K = 1) by "
        "EAP on the training batch with mean ablation (discovery `\"batch\"`). `forward` "
        "trains under `edge_mask` (its `target` column is the *unmasked* model; see "
        "`target_metric_masked` in the run's metrics.jsonl); `random` redraws a random edge "
        "set of the same size every step and restricts gradients like `gradient`; `lora` "
        "trains rank-8 adapters on every attention and MLP projection. Params moved = "
        "fraction of the model's real parameters (shared storage once) that differ from the "
        "start at the end; wall s = seconds of the run on a 2-core CPU shared with other jobs, "
        "so only roughly comparable across rows (see docs/benchmarks.md for controlled step "
        "timings); trainable at the end = the fraction the last step's circuit "
        "lets the optimizer change (with K = 1 the circuit changes every step, so the "
        "parameters moved over a run are the union of many circuits' parameters).",
        "",
    ]
    if first is not None:
        acc = first.get("evals_accuracy", {})
        parts += [
            f"Before tuning: target {first['target_metric']:+.2f} (accuracy "
            f"{_fmt(first.get('target_accuracy'))}), general LM loss "
            f"{first['general_loss']:.3f}, other tasks' accuracy "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(acc.items())) + ".",
            "",
        ]
    parts += ["## Modes and learning rates", "", markdown_table(header, rows), ""]
    if sweep:
        parts += [
            "## Sweep: rediscovery interval K and circuit size N (mode gradient)", "",
            markdown_table(["K", "N", "target at end", "target acc", "general LM loss",
                            f"general LM loss when target acc first >= {MATCH}", "params moved",
                            "trainable at the end", "wall s"], sweep), "",
        ]
    twin = results.get(f"sweep-k1-n{sizes[1]}")
    for key in main_keys:
        res = results[key]
        if twin is not None and key.startswith("gradient-") and \
                res["config"].semantic_dict() == twin["config"].semantic_dict():
            same = [a["target_metric"] for a in res["records"]] == \
                [b["target_metric"] for b in twin["records"]]
            parts += [f"Determinism check: the sweep's K = 1, N = {sizes[1]} run and `{key}` "
                      "have the same configuration and are separate runs, each from a fresh "
                      "model load into its own run directory; their "
                      f"metrics are {'identical' if same else 'DIFFERENT'} at every "
                      "evaluation.", ""]
    gradient_keys = [k for k in main_keys if k.startswith("gradient-")]
    if gradient_keys:
        best = max(gradient_keys, key=lambda k: results[k]["last"]["target_metric"])
        parts += ["## The circuit before and after (gradient circuit-tuning)", "",
                  _circuit_section(Path(args.out), best, args.steps), ""]
    parts += ["## Reading the numbers", "", *_reading(results, main_keys), ""]
    EXPERIMENTS.write_text("\n".join(parts), encoding="utf-8")


def _reading(results: dict[str, Any], keys: list[str]) -> list[str]:
    """Plain statements computed from the table (no interpretation beyond the numbers)."""
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for k in keys:
        by_mode.setdefault(results[k]["config"].mode, []).append(results[k])
    lines = []
    for mode, runs in by_mode.items():
        best = max(runs, key=lambda r: r["last"]["target_metric"])
        delta = best["last"]["general_loss"] - best["first"]["general_loss"]
        lines.append(
            f"- `{mode}`: best target {best['last']['target_metric']:+.2f} "
            f"(lr {best['config'].lr:g}, accuracy {_fmt(best['last'].get('target_accuracy'))}),"
            f" general LM loss {delta:+.3f} from the start, "
            f"{best['last']['params_moved']:.1%} of parameters moved."
        )
    lines.append("")
    lines.append(f"At matched target accuracy (first evaluation with accuracy >= {MATCH}), "
                 "the lowest general LM loss each mode reached (start: "
                 f"{results[keys[0]]['first']['general_loss']:.3f}):" if keys else "")
    for mode, runs in by_mode.items():
        reached = []
        for r in runs:
            hit = next((x for x in r["records"] if (x.get("target_accuracy") or 0) >= MATCH),
                       None)
            if hit is not None:
                reached.append((hit["general_loss"], hit["step"], r["config"].lr))
        if reached:
            loss, step, lr = min(reached)
            lines.append(f"- `{mode}`: {loss:.3f} (lr {lr:g}, step {step})")
        else:
            lines.append(f"- `{mode}`: accuracy {MATCH} not reached in any run")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpt2-small", action="store_true")
    p.add_argument("--no-report", action="store_true")
    p.set_defaults(func=speed)
    e = sub.add_parser("experiment")
    e.add_argument("--model", default="zoo:tiny-gpt2")
    e.add_argument("--steps", type=int, default=150)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--eval-every", type=int, default=25)
    e.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    e.add_argument("--n", type=int, default=128)
    e.add_argument("--n-train", type=int, default=1024)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", default="/tmp/ctlens-experiments")
    e.add_argument("--label", default=None,
                   help="how docs/experiments.md names the model (default: --model)")
    e.add_argument("--modes", default="gradient,forward,full,random,lora",
                   help="modes of the main grid (comma-separated)")
    e.add_argument("--part", choices=["main", "sweep", "all"], default="all",
                   help="main: modes x learning rates; sweep: K x N (run both in parallel)")
    e.add_argument("--ks", default="1,4,16", help="rediscovery intervals of the sweep")
    e.add_argument("--sweep-lr", type=float, default=1e-3, help="learning rate of the sweep")
    e.set_defaults(func=experiment)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
