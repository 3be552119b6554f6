# ruff: noqa: E402, B018
# %% [markdown]
# # Circuit-tuning: fine-tune a model inside its circuit
#
# *Circuit-tuning* ("Fine-Tuning is Subgraph Search", Li et al. 2025,
# [arXiv 2502.06106](https://arxiv.org/abs/2502.06106)) alternates two steps:
#
# 1. **discover** the circuit of the task on the current batch (EAP, keep the top-N edges),
# 2. **tune** only the parameters that read or write along those edges; everything else
#    stays fixed (bit-identical, even under Adam's momentum).
#
# The paper's headline experiment teaches GPT-2 to produce the *wrong* verb number
# ("the keys to the cabinet **is**"). We repeat it in miniature on the zoo's `tiny-gpt2`,
# watch the circuit evolve during training, compare the circuit before and after, and
# compare with ordinary full fine-tuning on the same budget.
#
# Everything here is small on purpose (a few dozen steps on the CPU); the same code scales
# to GPT-2 small and Llama models.

# %%
import tempfile
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.subplots import make_subplots

import ctlens
from ctlens import tasks, zoo  # task bundles and the model zoo

pio.renderers.default = "plotly_mimetype+notebook"
torch.manual_seed(0)
torch.set_num_threads(1)  # the zoo models are tiny: one CPU thread is the fastest
runs = Path(tempfile.mkdtemp(prefix="ctlens-runs-"))

# %% [markdown]
# ## The task: agreement-flip
#
# `agreement-flip` bundles everything a tuning run needs:
#
# - `discovery`: clean/corrupt pairs whose metric is `logit(wrong verb) - logit(right verb)`
#   (so the model starts *negative*: it is good at agreement);
# - training rows (`train_tokens`) whose target token is the wrong verb form;
# - evaluation sets: the target metric plus the other tasks the model knows (agreement,
#   IOI, pronouns, induction) and a held-out general text corpus, to see what the tuning
#   costs elsewhere.

# %%
task = tasks.load("agreement-flip", n=64, n_train=256, n_general=32, seed=0)
print(task.description)
tok = zoo.tokenizer()
row = task.train_tokens[0][task.train_attention_mask[0]]
print("a training row:", tok.decode(row))
print("evaluation sets:", list(task.evals))

# %% [markdown]
# ## A circuit-tuning run
#
# `ctlens.TuneConfig` holds every knob. The ones that matter here:
#
# - `mode="gradient"`: the paper's rule; only the circuit's parameter slices move;
# - `top_n`: the circuit size (50 edges; the cell prints what share of the graph that is);
# - `every_k=1`: rediscover the circuit at every step, as the paper does;
# - `eval_every`: how often to evaluate and store a circuit snapshot.
#
# The run writes a *run directory* (`run.json`, `metrics.jsonl`, one circuit per
# evaluation, checkpoints, and the tuned model as a plain HF directory). Running it again
# on the same directory resumes.

# %%
config = ctlens.TuneConfig(mode="gradient", top_n=50, every_k=1, steps=40, batch_size=16,
                           lr=1e-3, eval_every=10, eval_examples=64, save_every=40,
                           progress=False)
model = ctlens.load_model("zoo:tiny-gpt2")
result = ctlens.CircuitTuner(model, task, config).run(runs / "circuit")
n_edges = ctlens.Graph.from_model(model).n_edges
print(f"circuit size: {config.top_n} of {n_edges} edges ({config.top_n / n_edges:.1%})")
start = ctlens.viz.read_run(runs / "circuit").metrics[0]["target_metric"]
print(f"target metric at step 0: {start:+.2f} "
      f"({'negative: the model does agreement right' if start < 0 else 'not negative'})")
print({k: round(result.metrics[k], 3) for k in ("step", "target_metric", "general_loss",
                                             "trainable_fraction", "params_moved")})

# %% [markdown]
# ## Watch the circuit evolve
#
# `plot_evolution` reads the run directory: drag the slider (or press play) to see the
# circuit at each evaluation; below it, the target metric, the general loss, the circuit
# size, how similar each circuit is to the first and the previous one (Jaccard), and the
# fraction of parameters that moved.

# %%
ctlens.viz.plot_evolution(runs / "circuit", top=50)

# %% [markdown]
# ## Before and after
#
# `plot_diff` draws two circuits on one layout: orange edges left the circuit (only in the
# first), blue ones entered it (only in the second); at first only the 20 strongest of each
# are drawn, and the buttons above the drawing show the rest and the kept edges (grey).
# With a run directory it compares two of its snapshots (by default the first and the
# last).

# %%
ctlens.viz.plot_diff(runs / "circuit")

# %% [markdown]
# The same comparison as numbers, straight from the `Circuit` objects:

# %%
run = ctlens.viz.read_run(runs / "circuit")
first, last = run.circuit(run.steps[0]), run.circuit(run.steps[-1])
print(f"edge Jaccard {first.edge_jaccard(last):.2f}, node Jaccard {first.node_jaccard(last):.2f}")
print("components that joined:", sorted(set(last.components) - set(first.components)))
print("components that left:  ", sorted(set(first.components) - set(last.components)))

# %% [markdown]
# ## Compare with full fine-tuning
#
# The same runner with `mode="full"` updates every parameter. We start again from a fresh
# copy of the zoo model (the tuner trains its model in place) and keep everything else
# equal: data order, steps, learning rate.

# %%
full_config = ctlens.TuneConfig(**{**config.to_dict(), "mode": "full"})
fresh = ctlens.load_model("zoo:tiny-gpt2")
full_result = ctlens.CircuitTuner(fresh, task, full_config).run(runs / "full")

# %% [markdown]
# Where does each run end on the target (above 0: the wrong verb form is preferred), and
# what does each cost elsewhere: the general loss on held-out text and the other tasks the
# model knew? Note also the fraction of parameters that *moved* by the end: the circuit
# changes at every step, so over a run circuit-tuning can touch more parameters than any
# single circuit holds (`trainable_fraction` in the metrics is the share of one step's
# circuit). The last cell of this section prints what these runs did.

# %%
both = {"circuit-tuning": ctlens.viz.read_run(runs / "circuit"),
        "full fine-tuning": ctlens.viz.read_run(runs / "full")}
panels = [("target_metric", "target metric (wrong - right verb)"),
          ("general_loss", "general LM loss (held out)"),
          ("params_moved", "fraction of parameters moved")]
fig = make_subplots(rows=1, cols=3, subplot_titles=[title for _, title in panels])
for colour, (name, r) in zip(("#1f77b4", "#d62728"), both.items(), strict=True):
    for col, (key, _) in enumerate(panels, start=1):
        steps, values = r.metric_series(key)
        fig.add_trace(go.Scatter(x=steps, y=values, name=name, legendgroup=name,
                                 showlegend=col == 1, line_color=colour), row=1, col=col)
fig.update_xaxes(title_text="step")
fig.update_layout(height=380, title="circuit-tuning vs full fine-tuning (same data, steps and lr)")
fig

# %%
for name, r in both.items():
    end = r.metrics[-1]
    others = ", ".join(f"{k} {v:+.2f}" for k, v in end["evals"].items() if k != task.name)
    print(f"{name:17} target {end['target_metric']:+.2f}  general loss "
          f"{end['general_loss']:.3f}  moved {end['params_moved']:.1%}\n{'':17} {others}")
reached = [name for name, r in both.items() if r.metrics[-1]["target_metric"] > 0]
print("reached the target (metric > 0):", ", ".join(reached) or "neither")
cheaper = min(both, key=lambda name: both[name].metrics[-1]["general_loss"])
print(f"lower general loss at the end: {cheaper}")
end = both["circuit-tuning"].metrics[-1]
relation = "more" if end["params_moved"] > end["trainable_fraction"] else "no more"
print(f"circuit-tuning moved {end['params_moved']:.1%} of the parameters over the run, "
      f"{relation} than its last circuit holds ({end['trainable_fraction']:.1%})")

# %% [markdown]
# ## From the command line, and the HTML report
#
# The same run from a shell (running it again resumes), and a self-contained HTML report
# of it (all figures, config and metrics; opens offline):
#
# ```bash
# ctlens tune --model zoo:tiny-gpt2 --task agreement-flip --mode gradient --top-n 100 \
#     --steps 40 --out runs/flip
# ctlens report runs/flip          # writes runs/flip/report.html
# ```
#
# The tuned weights are a plain HuggingFace model directory, so they load anywhere:

# %%
tuned = ctlens.load_model(result.model_dir)
report = ctlens.viz.write_report(runs / "circuit")
print(result.model_dir.name, "->", tuned.cfg.n_layers, "layers;", "report:", report.name)

# %% [markdown]
# ## Neuron groups: a circuit that opens part of an MLP
#
# With one node per MLP, a circuit edge that touches an MLP unlocks the whole MLP for
# training. `Graph.from_model(model, mlp_groups=G)` splits each MLP into `G` equal groups
# of neurons (`m{l}.n{j}`, the paper's "MLP heads"), and gradient restriction then opens
# only the circuit groups' slices of `W_in` and `W_out`. The cell scores a fresh copy of
# the model on both graphs, keeps the same 2 % of each graph's edges, and counts the
# parameters `restrict_gradients` would let move (no training). `ctlens tune
# --mlp-groups G` (or `--mlp-group-size`) runs circuit-tuning on the grouped graph.

# %%
base = ctlens.load_model("zoo:tiny-gpt2")
groups, fraction = 8, 0.02
circuits, share = {}, {}
for G in (1, groups):
    graph = ctlens.Graph.from_model(base, mlp_groups=G)
    scores = ctlens.attribute(base, task.discovery, graph=graph, progress=False)
    circuits[G] = ctlens.Circuit.from_scores(scores, "top_n", top_n=fraction)
    with ctlens.restrict_gradients(base, circuits[G]) as r:
        share[G] = r.n_trainable / r.n_total
    print(f"{G} group(s) per MLP: {len(circuits[G].edges)} of {graph.n_edges} edges, "
          f"{r.n_trainable:,} of {r.n_total:,} parameters trainable ({share[G]:.1%})")
fewer = "fewer" if share[groups] < share[1] else "no fewer"
print(f"at {fraction:.0%} of the edges the grouped circuit makes {fewer} parameters "
      f"trainable than the ungrouped one ({share[groups]:.1%} vs {share[1]:.1%})")
ctlens.viz.plot_circuit(circuits[groups], label=f"circuit with {groups} groups per MLP")

# %% [markdown]
# ## Against matched controls: the stored experiment
#
# One run at one seed and one learning rate says little. `benchmarks/experiment.py` runs
# circuit-tuning (`gradient`), full fine-tuning and random circuits with the same number of
# trainable parameters (`random-parameters`) at every learning rate of a grid, over ten
# paired seeds, on every zoo model, and compares them at *matched target* on the envelope
# over the learning rates: at each target, the lowest general LM loss any learning rate
# had when its target first got there. This cell only *reads* the results it stored
# (`benchmarks/results/experiment.json`; the grid takes hours, far longer than a notebook
# should) and draws the same figure as `docs/experiments.md`: each mode's envelope through
# target and general LM loss, mean over seeds with 95 % t-intervals, one panel per model.
# Left is better. The verdict, the tests and every paired cell are in
# `docs/experiments.md`.

# %%
import json  # noqa: E402
import sys  # noqa: E402

# the repository's benchmarks/, from notebooks/, the repository root or the docs build
here = Path.cwd().resolve()
bench = next((d / "benchmarks" for d in (here, *here.parents)
              if (d / "benchmarks" / "results").is_dir()), None)
stored = None if bench is None else bench / "results" / "experiment.json"
if stored is None or not stored.is_file():
    print("no stored results: run python benchmarks/experiment.py all")
else:
    sys.path.insert(0, str(bench.resolve()))
    from experiment_figures import pareto_figure  # the figure docs/experiments.md shows

    results = json.loads(stored.read_text())
    print(f"{results['runs_done']} runs, seeds {results['seeds']}, {results['steps']} steps")
    if results.get("protocol") != "envelope":
        print("these results predate the envelope protocol (one lr per mode): each line is "
              "that lr's path; python benchmarks/experiment.py all regenerates them")
    pareto_figure(results, groups=1).show()
