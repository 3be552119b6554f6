# ruff: noqa: E402, B018
# %% [markdown]
# # Quickstart: find a circuit, check it, explore it
#
# In ten minutes of reading (and under a minute of CPU) this notebook walks the first half
# of ctlens's pipeline:
#
# 1. load a tiny pretrained model from the **zoo** (shipped with ctlens, no network),
# 2. **attribute** a task: score every edge of the model's graph with edge attribution
#    patching (EAP),
# 3. select a **circuit** and look at it,
# 4. check that the circuit is **faithful**: run the model with every other edge ablated,
# 5. export it to **networkx** and ask graph questions: which paths lead from the input to
#    the logits, and which heads lie on most of them.
#
# The task is subject-verb **agreement**: `the key to the cabinets` must continue with
# `is`, not `are`. The number of the *subject* decides, not the nearest noun.

# %% [markdown]
# ## Setup
#
# Plots are plotly figures. The renderer below embeds plotly.js in the notebook itself, so
# the figures show in Jupyter, VS Code and in exported HTML, with no network access.

# %%
from collections import Counter

import networkx as nx
import plotly.graph_objects as go
import plotly.io as pio
import torch

import ctlens
from ctlens import tasks, zoo  # task bundles and the model zoo

pio.renderers.default = "plotly_mimetype+notebook"
torch.manual_seed(0)
torch.set_num_threads(1)  # the zoo models are tiny: one CPU thread is the fastest

# %% [markdown]
# ## 1. Load a zoo model
#
# `ctlens.load_model` returns a TransformerLens 4 `TransformerBridge` with the hooks that
# ctlens needs (per-head outputs, separate q/k/v inputs). `tiny-llama` is a 3-layer
# Llama-style model (8 query heads sharing 4 key/value heads) trained on ctlens's small
# synthetic English. Its **graph** lists the *senders* (components that write to the
# residual stream) and *receivers* (inputs that read it).

# %%
print(zoo.names())
model = ctlens.load_model("zoo:tiny-llama")
graph = ctlens.Graph.from_model(model)
graph

# %%
print("senders:  ", graph.senders[:5], "...", graph.senders[-2:])
print("receivers:", graph.receivers[:5], "...", graph.receivers[-3:])
print("valid edges:", graph.n_edges)

# %% [markdown]
# ## 2. The task
#
# `ctlens.tasks.load` builds a task from the synthetic language. Its `discovery` part is a
# `TaskData`: *clean* prompts, *corrupt* prompts that differ only in the subject's number,
# and the two answers. The metric is the logit difference `logit(correct) - logit(wrong)`
# at the last token.

# %%
task = tasks.load("agreement", n=64, seed=0)
data = task.discovery
tok = model.tokenizer
for i in range(3):
    clean = tok.decode(data.clean[i][data.attention_mask[i]])
    corrupt = tok.decode(data.corrupt[i][data.attention_mask[i]])
    print(f"{clean!r:60} -> {tok.decode(data.correct[i])!r} (not {tok.decode(data.wrong[i])!r})")
    print(f"{corrupt!r:60}    corrupt")

# %% [markdown]
# ## 3. Attribute: score every edge
#
# EAP estimates, for every edge `s -> r`, how much the metric would change if that edge
# carried the corrupt prompt's activation instead of the clean one:
# `score = (a_s^corrupt - a_s^clean) · dM/dx_r`. One clean forward, one corrupt forward and
# one backward pass score all edges at once. A **negative** score means the edge helps
# the model get the answer right.

# %%
scores = ctlens.attribute(model, data, method="eap", ablation="corrupt", progress=False)
meta = scores.metadata
print(f"metric: clean {meta['metric_clean']:+.2f}, corrupt {meta['metric_corrupt']:+.2f}")
for sender, receiver, value in scores.top(8):
    print(f"{sender:>6} -> {receiver:<9} {value:+.3f}")

# %% [markdown]
# A node's total effect is the sum of its outgoing edge scores. The heatmap shows one cell
# per head and one per MLP (last column): the components that matter most stand out.

# %%
ctlens.viz.plot_node_scores(scores)

# %% [markdown]
# ## 4. Select and draw a circuit
#
# A circuit is a set of edges. `Circuit.from_scores` keeps the `top_n` edges by |score|;
# `prune=True` then drops edges that lie on no path from `input` to `logits` (they could
# not influence the output through the circuit anyway).
#
# In the drawing, `input` is at the bottom and `logits` at the top; each head has three
# ports below it for its query (solid), key (dashed) and value (dotted) inputs. Hover an
# edge or a node for its score.

# %%
circuit = ctlens.Circuit.from_scores(scores, top_n=60, prune=True)
print(circuit)
print("components:", circuit.components)
ctlens.viz.plot_circuit(circuit)

# %% [markdown]
# ## 5. Is the circuit faithful?
#
# Attribution scores are a linear estimate. The real test: run the model with **every edge
# outside the circuit ablated** (here: replaced by its value on the corrupt prompt) and see
# how much of the behaviour survives.
#
# `faithfulness = (M_circuit - M_empty) / (M_full - M_empty)`: 1 means the circuit alone
# does what the whole model does, 0 means it does no better than ablating everything. We
# check it on held-out prompts (`task.evals["agreement"]`), not on the prompts the circuit
# was found with.

# %%
held_out = task.evals["agreement"]
result = ctlens.faithfulness(model, held_out, circuit, ablation="corrupt")
print(f"{circuit.n_edges} of {graph.n_edges} edges: faithfulness {result.faithfulness:.2f}")
print(f"metric: full model {result.metric_full:+.2f}, circuit {result.metric_circuit:+.2f}, "
      f"empty circuit {result.metric_empty:+.2f}")

# %% [markdown]
# How does faithfulness grow with circuit size? `faithfulness_curve` evaluates the top-N
# circuits on the grid of the MIB benchmark (0.1 % to 100 % of the edges) and integrates
# it: **CPR** (area under the curve, higher is better) and **CMD** (area between the curve
# and 1, lower is better).

# %%
curve = ctlens.faithfulness_curve(model, held_out, scores, ablation="corrupt")
print(f"CPR {curve.cpr:.3f}   CMD {curve.cmd:.3f}")

fig = go.Figure(go.Scatter(x=[100 * f for f in curve.fractions], y=curve.faithfulness,
                           mode="lines+markers", text=[f"{n} edges" for n in curve.n_edges]))
fig.add_hline(y=1, line_dash="dot", line_color="grey")
fig.update_layout(title="faithfulness of the top-N circuits (held-out prompts)",
                  xaxis_title="edges kept (%)", yaxis_title="faithfulness",
                  xaxis_type="log", height=380)
fig

# %% [markdown]
# ## 6. The circuit as a networkx graph
#
# `Circuit.to_networkx()` returns the whole graph with `in_circuit` on each edge (and
# `score` when known). It also has *internal* edges from each q/k/v receiver to its head, so
# that paths can run *through* heads. Keeping the circuit edges plus the internal ones gives
# a directed acyclic graph in which every `input -> logits` path is a route information
# takes through the circuit.

# %%
g = circuit.to_networkx()
keep = [(u, v) for u, v, d in g.edges(data=True) if d["in_circuit"] or d["internal"]]
dag = g.edge_subgraph(keep)
dag = dag.subgraph(nx.descendants(dag, "input") | nx.ancestors(dag, "logits")).copy()
print(dag)
print("is a DAG:", nx.is_directed_acyclic_graph(dag))

paths = list(nx.all_simple_paths(dag, "input", "logits"))
print(f"{len(paths)} paths from input to logits; the shortest ones:")
for path in sorted(paths, key=len)[:5]:
    print("  " + " -> ".join(path))

# %% [markdown]
# Which heads and MLPs lie on the most paths? A component on many paths is a hub of the
# circuit: ablating it cuts many routes at once. (Receivers such as `a1.h3.q` are the ports
# of head `a1.h3`, so we count only senders.)

# %%
on_paths = Counter(node for path in paths for node in set(path[1:-1]) if node in graph.senders)
for node, count in on_paths.most_common(6):
    print(f"{node:>6} lies on {count:4d} of {len(paths)} paths")

# %% [markdown]
# When MLPs top this list, the task's information flows mostly through them; the heads
# high on the list are the ones that move the subject's number to the last position,
# where the verb is predicted.
#
# networkx also finds the *strongest* route: the longest path in the DAG when each edge is
# weighted by its |score| (internal edges weigh 0).

# %%
for _, _, d in dag.edges(data=True):
    d["weight"] = abs(d.get("score", 0.0)) if not d["internal"] else 0.0
strongest = nx.dag_longest_path(dag, weight="weight")
print(" -> ".join(strongest))

# %% [markdown]
# ## 7. Save and share
#
# Circuits are saved as versioned JSON (never pickle) and reload on the same graph. The
# same first half of the pipeline runs from the command line:
#
# ```bash
# ctlens discover --model zoo:tiny-llama --task agreement --top 20 --out agreement.json
# ```

# %%
import tempfile
from pathlib import Path

path = circuit.save(Path(tempfile.mkdtemp()) / "agreement.json")
again = ctlens.Circuit.load(path, model=model)
print(again == circuit, again)

# %% [markdown]
# **Next:** `02_circuit_tuning.ipynb` fine-tunes a model *inside* such a circuit;
# `03_teaching_induction.ipynb` is a lesson on circuits with exercises.
