# ruff: noqa: E402, B018
# %% [markdown]
# # A lesson on circuits: the induction circuit
#
# **Audience:** students who know what a transformer layer is (attention heads, MLPs,
# residual connections) and want to see how interpretability research finds *which parts*
# of a model do a task.
#
# **You will learn**
#
# 1. what a *circuit* is, and why the residual stream makes a model a graph;
# 2. why a head's query, key and value inputs are three separate places in that graph;
# 3. how to find the *induction circuit* (a previous-token head feeding an induction head's
#    key) from attention patterns and from edge attribution;
# 4. how good the fast approximations (EAP, EAP-IG) are, compared with really patching
#    every edge.
#
# Exercises with worked solutions are at the end of each part. The solution cells are
# collapsed: try first, then click to expand.

# %%
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
import torch

import ctlens
from ctlens import tasks  # the task bundles

pio.renderers.default = "plotly_mimetype+notebook"
torch.manual_seed(0)
torch.set_num_threads(1)  # the zoo models are tiny: one CPU thread is the fastest

# %% [markdown]
# ## Part 1. A model is a graph
#
# In a (pre-norm) transformer, every attention head and every MLP **adds** its output to
# one running vector per position, the *residual stream*. And every component **reads**
# that same stream (through its own LayerNorm). So what a component reads is exactly the
# sum of what the earlier components wrote:
#
# $$x_{\text{reader}} = \text{embedding} + \sum_{\text{earlier writers } s} a_s$$
#
# Each term of that sum is an **edge** from a writer (a *sender*) to a reader (a
# *receiver*). A **circuit** is a small set of edges that is enough to do a task: keep
# those, ablate all the others, and the model still behaves the same.
#
# We use `tiny-llama`, a 3-layer Llama-style model trained by ctlens on a small synthetic
# English. Each layer has 8 query heads; pairs of them share one key and one value
# projection (*grouped-query attention*, 4 key/value groups), as in today's large models.

# %%
model = ctlens.load_model("zoo:tiny-llama")
graph = ctlens.Graph.from_model(model)
print(graph)
print("senders:  ", graph.senders)
print("receivers:", graph.receivers[:17], "...")

# %% [markdown]
# Senders are `input` (the token embedding; positions enter through rotary embeddings
# inside attention), each head `a{layer}.h{head}` and each MLP `m{layer}`. Receivers are
# each head's **q** input (`a{layer}.h{head}.q`), each key/value group's **k** and **v**
# input (`a{layer}.g{group}.k`, shared by heads `2g` and `2g+1`), each MLP, and `logits`
# (the final residual stream, which the unembedding reads).
#
# An edge exists only if the sender writes *before* the receiver reads. `graph.valid` is the
# `[senders, receivers]` table of which edges exist:

# %%
fig = px.imshow(graph.valid.int(), x=graph.receivers, y=graph.senders, aspect="auto",
                color_continuous_scale="Greys", title="valid edges (black)")
fig.update_layout(height=520, coloraxis_showscale=False)
fig

# %% [markdown]
# ### Why are q, k and v separate receivers?
#
# A head uses its input in three different ways: the **query** says what the current
# position is looking for, the **key** says what each earlier position offers, and the
# **value** is what gets moved once a match is found. The same sender can matter for one
# of them and not at all for the others. Induction is the classic example:
#
# - in `... A B ... A`, a **previous-token head** at position `B` attends to `A` and writes
#   "the token before me was A" into `B`'s residual stream;
# - an **induction head** at the second `A` looks for a position whose *key* says "the
#   token before me was A" (that is `B`), attends to it and copies `B` (through its
#   *value*), so the model predicts `B`.
#
# So the previous-token head feeds the induction head's **key**, not its query. A graph
# with one node per head could not say that; with q/k/v receivers, the circuit contains
# exactly the edge from the previous-token head into the key input of the induction head's
# group, e.g. `a0.h5 -> a1.g1.k` in `tiny-llama`, or a path through an MLP on the way,
# `a0.h5 -> m0 -> a1.g1.k` (its model card lists both, with their ranks).

# %% [markdown]
# ### Exercise 1
#
# `tiny-llama` has `L = 3` layers, `H = 8` query heads and `K = 4` key/value groups. Without
# looking at `graph.n_edges`, work out how many valid edges its graph has. Hint: count, for
# each receiver, how many senders write before it reads (heads of layer `l` read before any
# head of layer `l` writes; the MLP of layer `l` reads after them).

# %% [markdown]
# **Solution** (expand the cell below).

# %% [solution]
L, H, K = 3, 8, 4
edges = 0
for layer in range(L):
    upstream = 1 + layer * (H + 1)    # input + all heads and MLPs of earlier layers
    edges += (H + 2 * K) * upstream   # H queries, K keys and K values
    edges += upstream + H             # the MLP also reads this layer's heads
edges += 1 + L * (H + 1)              # logits read every sender
print(edges, "==", graph.n_edges, edges == graph.n_edges)

# %% [markdown]
# ## Part 2. The induction task
#
# Each prompt is a random sequence of words, repeated: `<bos> x1 ... x12 x1 ... x12`. In
# the second copy, every next word is predictable *only* by induction. The metric is the
# mean log-probability of those repeated words. The *corrupt* prompt replaces the **first**
# copy by fresh words: the tokens where the metric is read are unchanged, but there is
# nothing earlier to copy from.

# %%
task = tasks.load("induction", n=32, seed=0)
data = task.discovery
tok = model.tokenizer
print("clean:  ", tok.decode(data.clean[0]))
print("corrupt:", tok.decode(data.corrupt[0]))
print("metric read at positions", data.positions[0].tolist())

# %% [markdown]
# ### Find the heads from their attention patterns
#
# A head's attention pattern says where each position looks. On the repeated sequences:
#
# - the **previous-token score** of a head is its mean attention from position `p` to
#   `p - 1`;
# - the **induction score** is its mean attention from a token of the second copy to the
#   token that *followed* the same word in the first copy (`p - 12 + 1`).
#
# TransformerLens records every pattern in a cache (`blocks.{l}.attn.hook_pattern`,
# `[batch, head, query, key]`).

# %%
length = 12
_, cache = model.run_with_cache(data.clean)
q = torch.arange(length + 1, 2 * length)
patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(graph.spec.n_layers)]
prev_score = torch.stack([p[:, :, q, q - 1].mean((0, 2)) for p in patterns])
ind_score = torch.stack([p[:, :, q, q - length + 1].mean((0, 2)) for p in patterns])
del cache, patterns

fig = go.Figure()
for name, s in (("previous-token score", prev_score), ("induction score", ind_score)):
    fig.add_trace(go.Heatmap(z=s, x=[f"h{h}" for h in range(s.shape[1])],
                             y=[f"layer {i}" for i in range(s.shape[0])], zmin=0, zmax=1,
                             colorscale="Blues", name=name, visible=name.startswith("prev")))
fig.update_layout(title="previous-token score (use the buttons to switch)", height=320,
                  updatemenus=[{"type": "buttons", "direction": "right", "y": 1.25, "buttons": [
                      {"label": "previous-token", "method": "update",
                       "args": [{"visible": [True, False]}, {"title": "previous-token score"}]},
                      {"label": "induction", "method": "update",
                       "args": [{"visible": [False, True]}, {"title": "induction score"}]}]}])
fig

# %%
ind_layer, ind_head = divmod(int(ind_score[1:].argmax()) + graph.spec.n_heads,
                             graph.spec.n_heads)
prev_layer, prev_head = divmod(int(prev_score[:ind_layer].argmax()), graph.spec.n_heads)
induction_head = f"a{ind_layer}.h{ind_head}"
previous_head = f"a{prev_layer}.h{prev_head}"
group = ind_head // (graph.spec.n_heads // graph.spec.n_kv_heads)
ports = {"q": f"{induction_head}.q", "k": f"a{ind_layer}.g{group}.k",
         "v": f"a{ind_layer}.g{group}.v"}
print(f"induction head {induction_head} (score {ind_score[ind_layer, ind_head]:.2f}), "
      f"previous-token head {previous_head} (score {prev_score[prev_layer, prev_head]:.2f})")

# %% [markdown]
# ## Part 3. The same circuit from edge attribution
#
# Attention patterns only show where heads *look*. Edge attribution asks what each edge
# *does* for the metric: `score(s -> r) = (a_s^corrupt - a_s^clean) · dM/dx_r`, a
# first-order estimate of how the metric changes when that single edge gets the corrupt
# activation. A large negative score: the edge carries what the task needs.

# %%
eap = ctlens.attribute(model, data, method="eap", ablation="corrupt", progress=False)
print(f"metric: clean {eap.metadata['metric_clean']:.2f}, "
      f"corrupt {eap.metadata['metric_corrupt']:.2f}")
for rank, (s, r, v) in enumerate(eap.top(10), start=1):
    print(f"{rank:2d}. {s:>6} -> {r:<9} {v:+.3f}")

# %% [markdown]
# Where does the edge from the previous-token head into the induction head's **key** rank,
# and how does it compare with the same head's edges into the query and the value?

# %%
def standing(rank: int, n: int) -> str:
    """Where rank ``rank`` of ``n`` sits, in words: the sentences below come from this."""
    share = rank / n
    if share <= 0.05:
        return f"among the strongest {share:.0%} of the edges"
    if share <= 0.25:
        return "in the top quarter of the edges, but not among the strongest few percent"
    if share <= 0.5:
        return "in the top half of the edges, far from the strongest few percent"
    return "in the bottom half of the edges: EAP sees almost no effect"


ranking = [(s, r) for s, r, _ in eap.top(graph.n_edges)]
for receiver in ports.values():
    edge = (previous_head, receiver)
    i, j = graph.edge_index(*edge)
    print(f"{edge[0]} -> {edge[1]:<9} score {eap.scores[i, j]:+.3f}  "
          f"rank {ranking.index(edge) + 1} of {graph.n_edges}")
key_rank = ranking.index((previous_head, ports["k"])) + 1
print(f"\nThe edge into the key ranks {key_rank} of {graph.n_edges} by |EAP score|: "
      f"{standing(key_rank, graph.n_edges)}.")

# %% [markdown]
# Whatever rank EAP gives the key edge, keep in mind that EAP is a *linear* estimate of
# what removing an edge does. Exercise 2 checks it by really removing the edge.
#
# A circuit of the strongest edges, drawn on the model's layout (keys are dashed, values
# dotted; hover an edge for its score):

# %%
circuit = ctlens.Circuit.from_scores(eap, top_n=40, prune=True)
ctlens.viz.plot_circuit(circuit, title=f"induction circuit: {circuit.n_edges} edges")

# %% [markdown]
# ### Exercise 2
#
# EAP is an *estimate*. Measure the real effect of removing only the edge
# `previous_head -> ports["k"]`: build a circuit with every edge **except** that one
# and compare the metric with the full model's. (Hint: `ctlens.Circuit.full(graph)`,
# `Circuit.from_edges`, the `-` operator on circuits, and `ctlens.faithfulness`, whose
# result has `metric_circuit` and `metric_full`.)

# %% [markdown]
# **Solution** (expand the cell below).

# %% [solution]
edge = (previous_head, ports["k"])
without_edge = ctlens.Circuit.full(graph) - ctlens.Circuit.from_edges(graph, [edge])
res = ctlens.faithfulness(model, data, without_edge, ablation="corrupt")
real = res.metric_circuit - res.metric_full
estimate = float(eap.scores[graph.edge_index(*edge)])
print(f"metric without {edge[0]} -> {edge[1]}: {res.metric_circuit:.3f}, "
      f"full model {res.metric_full:.3f}: real effect {real:+.4f}")
print(f"EAP estimated {estimate:+.4f}")
ratio = abs(real) / max(abs(estimate), 1e-9)
if ratio >= 3:
    times = "more than 100" if ratio > 100 else f"{ratio:.0f}"
    print(f"The real effect is {times} times EAP's estimate: the estimate misses most of it.")
elif ratio <= 1 / 3:
    print("The real effect is less than a third of EAP's estimate: EAP overestimates it.")
else:
    print("EAP's estimate is within a factor of 3 of the real effect.")

# %% [markdown]
# When the real effect is far larger than EAP's estimate, the usual reason is this: the
# induction head puts almost all of its attention on one token, so its softmax is
# *saturated*, and the gradient of a saturated softmax is close to zero, even though
# removing the key signal moves the attention somewhere else entirely. A first-order
# estimate at the clean input cannot see that. Part 4 measures how often this happens.

# %% [markdown]
# ## Part 4. How good are the approximations?
#
# Three ways to score every edge:
#
# | method | what it does | cost per batch |
# |---|---|---|
# | `exact` | really patches each edge | one forward per edge |
# | `eap` | first-order estimate at the clean input | 2 forwards + 1 backward |
# | `eap-ig` | gradient averaged from corrupt to clean input | `steps` forwards + backwards |
#
# `tiny-llama` is small enough to compute the exact scores of all its edges (one forward
# pass per edge; the cell prints how long each method took), so we can check the
# approximations against the truth. We use 16 prompts.

# %%
small = data[:16]
methods = {
    "exact": ctlens.attribute(model, small, method="exact", progress=False),
    "eap": ctlens.attribute(model, small, method="eap", progress=False),
    "eap-ig": ctlens.attribute(model, small, method="eap-ig", steps=5, progress=False),
}
for name, s in methods.items():
    print(f"{name:7} {s.metadata['seconds']:6.2f} s")

# %% [markdown]
# Two numbers per method: the **Pearson** correlation of the scores with the exact ones,
# and the **Spearman** (rank) correlation, which is what matters when we keep the top-N
# edges. We compare only the valid edges.

# %%
valid = graph.valid


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().float()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


exact = methods["exact"].scores[valid]
correlation = {}
for name in ("eap", "eap-ig"):
    approx = methods[name].scores[valid]
    correlation[name] = pearson(approx, exact), pearson(ranks(approx), ranks(exact))
    print(f"{name:7} Pearson {correlation[name][0]:.3f}   Spearman {correlation[name][1]:.3f}")
closer = max(correlation, key=lambda name: correlation[name][0])
print(f"{closer} tracks the exact scores more closely (Pearson "
      f"{correlation[closer][0]:.3f} against "
      f"{min(v[0] for v in correlation.values()):.3f}).")

# %%
fig = go.Figure()
for name, colour in (("eap", "#1f77b4"), ("eap-ig", "#ff7f0e")):
    fig.add_trace(go.Scatter(x=exact, y=methods[name].scores[valid], mode="markers",
                             name=name, marker={"size": 5, "opacity": 0.6, "color": colour},
                             text=[f"{s} -> {r}" for s, r in graph.edges()]))
low, high = float(exact.min()), float(exact.max())
fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="y = x",
                         line={"dash": "dot", "color": "grey"}))
fig.update_layout(title="approximate vs exact edge scores (hover a point for its edge)",
                  xaxis_title="exact: M(edge patched) - M(clean)",
                  yaxis_title="approximate score", height=480)
fig

# %% [markdown]
# How much of the largest exact effects does each approximation recover? A method
# underestimates an edge when its |score| is smaller than the edge's exact |effect|.

# %%
strongest = exact.abs().topk(10).indices
recovered = {}
for name in ("eap", "eap-ig"):
    approx = methods[name].scores[valid][strongest]
    under = int((approx.abs() < exact[strongest].abs()).sum())
    recovered[name] = float(approx.abs().sum() / exact[strongest].abs().sum())
    print(f"{name:7} underestimates {under} of the 10 largest exact effects and recovers "
          f"{recovered[name]:.0%} of their total size")
best = max(recovered, key=recovered.get)
print(f"{best} recovers more of the large effects ({recovered[best]:.0%} against "
      f"{min(recovered.values()):.0%}).")

# %% [markdown]
# EAP-IG evaluates the gradient at several points between the corrupt and the clean input,
# so it can see an attention change that a single gradient at the clean input misses.
# Ranks are a harder test: most edges have tiny effects, and their order is mostly noise.
# What matters for a circuit is whether the few large edges come out on top.
#
# And the edge this lesson is about: where does each method rank the previous-token head's
# edge into the induction head's key?

# %%
i, j = graph.edge_index(previous_head, ports["k"])
for name, s in methods.items():
    magnitude = s.scores.abs().masked_fill(~valid, -1.0)
    rank = int((magnitude > magnitude[i, j]).sum()) + 1
    print(f"{name:7} score {s.scores[i, j]:+.3f}, rank {rank:3d} of {graph.n_edges}: "
          f"{standing(rank, graph.n_edges)}")

# %% [markdown]
# ### Exercise 3
#
# Which edges does EAP get most wrong? List the five edges with the largest
# `|eap - exact|`, with both scores. Are they edges into heads' queries/keys (where
# attention's softmax makes the metric curved) or into values and MLPs?

# %% [markdown]
# **Solution** (expand the cell below).

# %% [solution]
error = (methods["eap"].scores - methods["exact"].scores).abs() * valid
flat = error.flatten().topk(5).indices
kinds = []
for index in flat.tolist():
    i, j = divmod(index, graph.n_receivers)
    kinds.append(graph.receiver_nodes[j].kind.value)
    print(f"{graph.senders[i]:>6} -> {graph.receivers[j]:<9} "
          f"eap {methods['eap'].scores[i, j]:+.3f}  exact {methods['exact'].scores[i, j]:+.3f}")
attention = sum(k in ("q", "k") for k in kinds)
values = kinds.count("v")
print(f"Of the five largest misses, {attention} go into queries or keys, {values} into "
      f"values and {5 - attention - values} into MLPs or the logits.")

# %% [markdown]
# **Discussion.** Misses into queries and keys come from the softmax: attention is a curved
# function of them. Misses into values, MLPs and the logits have another cause: patching one
# edge changes its receiver's input by a large vector, and everything downstream
# (normalisation, MLPs, the saturated attention of later heads) responds nonlinearly. A
# first-order estimate is reliable for small changes only; the count above says which kind
# dominates in this model.

# %% [markdown]
# ### Exercise 4
#
# Which scores select the most *faithful* circuits? For each of the three methods, compute
# the faithfulness curve of its top-N circuits on held-out prompts (`task.evals["induction"]`)
# with `ctlens.faithfulness_curve(model, held_out, scores, sizes=...)`, and compare their
# CPR (area under the curve: higher is better).

# %% [markdown]
# **Solution** (expand the cell below).

# %% [solution]
held_out = task.evals["induction"][:32]
sizes = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
print("edges:   " + "".join(f"{max(1, int(f * graph.n_edges)):>6}" for f in sizes) + "     CPR")
for name, s in methods.items():
    curve = ctlens.faithfulness_curve(model, held_out, s, sizes=sizes, ablation="corrupt")
    print(f"{name:8} " + "".join(f"{f:6.2f}" for f in curve.faithfulness) + f"   {curve.cpr:.3f}")

# %% [markdown]
# ## Summary
#
# - The residual stream turns a transformer into a graph of *senders* and *receivers*; a
#   circuit is a subset of its edges.
# - Splitting each head's input into q, k and v lets a circuit say *how* one head uses
#   another: the previous-token head feeds the induction head's **key**.
# - EAP scores every edge in one backward pass; EAP-IG costs a few more passes. Part 4
#   measured how close each comes to exact patching on this model; check any circuit
#   with `faithfulness`.
#
# **Further reading:** Olsson et al., *In-context Learning and Induction Heads* (2022);
# Syed et al., *Attribution Patching Outperforms Automated Circuit Discovery* (EAP, 2023);
# Hanna et al., *Have Faith in Faithfulness* (EAP-IG, 2024); Mueller et al., *MIB* (2025).
