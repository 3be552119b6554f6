"""Discovery: which circuit the tuner enforces at each rediscovery.

Three sources of edge scores, then one selection rule:

- ``"batch"`` (the paper's): the training forward itself is recorded by the shared EAP
  kernel (`ctlens.attribution.EapKernel`): sender outputs go into its buffer, receiver
  inputs get gradient hooks. After the forward the buffer becomes ``mean_s - a_s`` (the
  per-position mean over the global batch, padding excluded) and one backward of the task
  metric (or the loss's own backward, ``batch_metric="loss"``) fills the scores: exactly
  `ctlens.attribute` with mean ablation over that batch, without another forward.
- ``"task"``: `ctlens.attribute` on ``discovery_batches`` batches of the discovery pairs.
- ``mode="random"``: N random valid edges, seeded by ``(seed, step)``.

`CircuitSelection` (what `CircuitDiscovery.select` and `ctlens.CircuitTuningCallback` call)
optionally smooths scores by an exponential moving average across rediscoveries (its one
piece of state, ``ema``) and keeps the top N (by ``selection``), N from the schedule by the
one step -> N rule, `top_n_after`.

On a positional graph (``TuneConfig.spans``) every source scores (edge, span) pairs,
``[senders, receivers, spans]``: ``"batch"`` with the training rows' span labels (the
kernel's store sorted by span, as `ctlens.attribute` does), ``"task"`` with the discovery
data's; the means stay per position (a span's mask reads them at its own positions), and
N counts pairs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Float

from ctlens.attribution import EapKernel, SenderStore, attribute, mean_activations
from ctlens.bridge.hooks import model_device
from ctlens.circuit import Circuit
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.scores import EdgeScores
from ctlens.spans import SpanOrder
from ctlens.tuning import weights as W
from ctlens.tuning.config import TuneConfig
from ctlens.tuning.controls import MatchedControl, trainable_count
from ctlens.tuning.distributed import World
from ctlens.types import Ablation, Selection

SMALL_GRAPH = 256
"""Senders up to which batch discovery queues as many receiver columns as the store has rows
(the kernel's default there is 1: a grouped layer's rows were expanded again per hook)."""

Scores = Float[torch.Tensor, "n_senders n_receivers *spans"]
Means = Float[torch.Tensor, "n_senders seq d_model"]


def task_scores(
    model: Any, data: TaskData, config: TuneConfig, graph: Graph, t: int, world: World
) -> Scores:
    """``"task"`` discovery at step ``t``: EAP on ``discovery_batches`` batches of ``data``.

    The rows are a window over the discovery pairs that moves with each rediscovery; every
    rank scores its shard of them and the scores are summed across ranks, so all ranks
    select the same circuit. Shared by `CircuitTuner` and `ctlens.CircuitTuningCallback`.
    """
    n = len(data)
    want = min(n, config.batch_size * config.discovery_batches)
    start = (t // config.every_k) * want % n
    chosen = data[(torch.arange(want) + start) % n]
    reference = None
    if config.discovery_ablation is Ablation.MEAN:
        reference = mean_activations(model, chosen, batch_size=config.batch_size, graph=graph)
    local = world.shard(torch.arange(want))
    result = attribute(
        model, chosen[local], ablation=config.discovery_ablation, reference=reference,
        batch_size=config.batch_size, progress=False, graph=graph,
        max_memory=config.max_memory,
    )
    return world.sum_(result.scores * (len(local) / want))


def top_nodes_rank(scores: Scores, graph: Graph) -> Scores:
    """``selection="top_nodes"``: |score| x sender's summed |scores| x receiver's summed |scores|.

    The ranking of the paper's official code: an edge counts more when both of its ends
    matter overall. Sums run over valid edges; invalid entries stay 0. On a positional graph
    a node's sum runs over its edges at every span (a node is one set of parameters, shared
    by all positions), and each (edge, span) pair is ranked by its own |score| times both.
    """
    magnitude = scores.abs() * graph.dense_valid
    spans = tuple(range(2, magnitude.ndim))  # (2,) on a positional graph, else ()
    return (magnitude * magnitude.sum((1, *spans), keepdim=True)
            * magnitude.sum((0, *spans), keepdim=True))


def top_n_after(config: TuneConfig, steps_taken: int, n_edges: int | None = None) -> int:
    """N of the circuit in force after ``steps_taken`` optimizer steps.

    The circuit of the last step taken (``steps_taken - 1``); before any step, the first's.
    ``n_edges`` (the graph's valid edges) turns a fractional ``top_n`` into a count.
    """
    return config.top_n_at(max(steps_taken - 1, 0), n_edges)


class CircuitSelection:
    """The tuner's selection rule: scores -> the circuit of step ``t`` (module docstring).

    Args:
        config: the run's configuration (``ema``, ``selection``, the top-N schedule).
        graph: the model's graph.
        model_name: recorded in every circuit it selects.
        discovery: the ``discovery`` its circuits' metadata records (default
            ``config.discovery``).
    """

    def __init__(self, config: TuneConfig, graph: Graph, model_name: str | None,
                 discovery: str | None = None) -> None:
        self.config = config
        self.graph = graph
        self.model_name = model_name
        self.discovery = config.discovery if discovery is None else discovery
        self.ema: Scores | None = None
        """The moving average of scores so far (``ema > 0``; saved in checkpoints)."""

    def select(self, scores: Scores, t: int) -> Circuit:
        """The top-N circuit of ``scores`` (after the moving average) for step ``t``."""
        cfg = self.config
        scores = scores.detach().float().cpu()
        if cfg.ema > 0:
            self.ema = scores if self.ema is None else cfg.ema * self.ema + (1 - cfg.ema) * scores
            scores = self.ema
        n = cfg.top_n_at(t, self.graph.n_edges)
        metadata = {"step": t, "top_n": n, "mode": cfg.mode, "discovery": self.discovery}
        if cfg.selection is Selection.TOP_NODES:
            ranked = Circuit.from_scores(EdgeScores(top_nodes_rank(scores, self.graph),
                                                    self.graph, {}), top_n=n)
            metadata["selection"] = "top_nodes"
            return Circuit(self.graph, ranked.mask, scores, metadata, self.model_name)
        circuit = Circuit.from_scores(EdgeScores(scores, self.graph, {}), top_n=n)
        circuit.metadata = metadata
        circuit.model_name = self.model_name
        return circuit


class CircuitDiscovery:
    """Scores edges and selects the circuit for one run (see the module docstring).

    Args:
        model: the bridge being tuned.
        task: the run's task (`ctlens.tuning.TuneTask`).
        config: the run's configuration.
        graph: the model's graph.
        world: this process's place among data-parallel ranks.
        model_name: recorded in every circuit it selects.
        task_world: the ranks ``"task"`` discovery divides its rows among (default:
            ``world``; the run's parallelism says, `ctlens.tuning.parallel`).
    """

    def __init__(
        self, model: Any, task: Any, config: TuneConfig, graph: Graph, world: World,
        model_name: str, task_world: World | None = None,
    ) -> None:
        self.model = model
        self.task = task
        self.config = config
        self.graph = graph
        self.world = world
        self.task_world = world if task_world is None else task_world
        self.model_name = model_name
        self.selection = CircuitSelection(config, graph, model_name)
        self._control: MatchedControl | None = None

    @property
    def ema(self) -> Scores | None:
        """The selection's moving average of scores (`CircuitSelection.ema`)."""
        return self.selection.ema

    @ema.setter
    def ema(self, value: Scores | None) -> None:
        self.selection.ema = value

    # ------------------------------------------------------------------ batch discovery

    def recorded_forward(
        self, tokens: torch.Tensor, spans: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, EapKernel]:
        """The training forward, recorded by an `EapKernel` (its store holds ``-a_s``);
        ``spans``: the rows' ``[batch, seq]`` span labels on a positional graph."""
        graph = self.graph
        b, p = tokens.shape
        order = None
        if graph.positional:
            if spans is None:
                raise ValueError("a positional graph's batch discovery needs the rows' spans")
            order = SpanOrder(spans.to(model_device(self.model)), graph.n_spans)
        store = SenderStore(self.model, graph, b, p, torch.float32, order=order)
        scores = torch.zeros(graph.dense_shape, device=tokens.device)
        # a small graph's receivers are scored a store's worth of columns per product: the
        # queue is no larger than the store (`SenderStore.center` works in place)
        queue = graph.n_senders if graph.n_senders <= SMALL_GRAPH else None
        kernel = EapKernel(graph, store, scores, queue=queue)
        hooks = [*kernel.sender_hooks(self.model, -1.0), *kernel.receiver_hooks(self.model)]
        with torch.enable_grad():
            logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
        return logits, kernel

    def batch_scores(
        self,
        kernel: EapKernel,
        local: torch.Tensor,
        loss: torch.Tensor,
        metric_sum: torch.Tensor | None,
        training: bool,
    ) -> tuple[Scores, Means | None, bool]:
        """Edge scores of a recorded forward, the batch means (in the forward modes, whose
        masks read them; else None), and whether the loss's backward already ran
        (``batch_metric="loss"`` while ``training``).

        Score ``(mean - a_s) . dM/dx_r``, summed over positions, averaged over the global
        batch; ``M`` is the task metric (or minus the loss). The mean is per position over
        the global batch's real tokens, summed across ranks.
        """
        n_rows = self.world.sum_scalar(float(len(local)))
        use_loss = self.config.batch_metric == "loss" or metric_sum is None
        store = kernel.store
        mask = self.task.train_attention_mask[local].to(store.plain.device)
        centred = store.center(mask, self.world)  # the store holds (mean - a_s), 0 at padding
        means = store.expanded_means(*centred) if self.config.mode.masks_forward else None
        try:
            if use_loss:
                kernel.sign = -1.0
                if training:
                    loss.backward()
                else:
                    torch.autograd.grad(loss, kernel.inputs, allow_unused=True)
            else:
                assert metric_sum is not None
                torch.autograd.grad(metric_sum / n_rows, kernel.inputs, retain_graph=training,
                                    allow_unused=True)
        finally:
            kernel.close()
        return self.world.sum_(kernel.scores).cpu(), means, use_loss and training

    # ------------------------------------------------------------------ task discovery

    def task_scores(self, t: int) -> Scores:
        """``"task"`` discovery: mean scores over batches of the discovery pairs, divided
        among the ranks of ``task_world`` (a sharded model's strategy gives one rank: every
        rank scores all the rows, as FSDP's all-gathers need every rank to run the same
        forwards and backwards, which uneven per-rank shards of the rows would break)."""
        return task_scores(self.model, self.task.discovery, self.config, self.graph, t,
                           self.task_world)

    def training_means(self, rows: torch.Tensor) -> Means:
        """Per-position mean sender outputs over training rows ``rows`` (forward modes)."""
        data = TaskData(clean=self.task.train_tokens[rows],
                        attention_mask=self.task.train_attention_mask[rows], metric="kl")
        return mean_activations(
            self.model, data, batch_size=self.config.batch_size, graph=self.graph
        )

    def monitor_circuit(self, step: int) -> Circuit:
        """The task circuit of the current weights (for snapshots outside circuit modes)."""
        cfg = self.config
        data = self.task.discovery
        if cfg.eval_examples is not None:
            data = data[: cfg.eval_examples]
        scores = attribute(self.model, data, ablation=cfg.discovery_ablation,
                           batch_size=cfg.batch_size, progress=False, graph=self.graph,
                           max_memory=cfg.max_memory)
        n = top_n_after(cfg, step, self.graph.n_edges)
        circuit = Circuit.from_scores(scores, top_n=n)
        circuit.metadata = {"step": step, "top_n": n, "mode": cfg.mode, "discovery": "monitor"}
        circuit.model_name = self.model_name
        return circuit

    # ------------------------------------------------------------------ selection

    def select(self, scores: Scores, t: int) -> Circuit:
        """The top-N circuit of ``scores`` for step ``t`` (`CircuitSelection.select`)."""
        return self.selection.select(scores, t)

    def random_circuit(self, t: int, n: int | None = None) -> Circuit:
        """``mode="random"``: N random valid edges (``n``, default the schedule's), seeded by
        ``(seed, t)``."""
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * (t + 1))
        noise = torch.rand(self.graph.dense_shape, generator=gen)  # positional: pairs
        n = self.config.top_n_at(t, self.graph.n_edges) if n is None else n
        circuit = Circuit.from_scores(EdgeScores(noise, self.graph, {}), top_n=n)
        return Circuit(self.graph, circuit.mask, None,
                       {"step": t, "top_n": n, "mode": "random"}, self.model_name)

    def matched_random_circuit(self, target: Circuit, t: int) -> Circuit:
        """``random_match="parameters"`` / ``"composition"``: a random circuit with the
        trainable parameters of ``target`` (in total or per node kind), seeded by
        ``(seed, t)``; its metadata records ``target``'s trainable fraction.

        On a positional graph the nodes are drawn on the position-free graph (what moves
        depends on the nodes only) and each drawn edge is kept at every span."""
        cfg = self.config
        graph = self.graph
        if self._control is None:  # its graph is the position-free one: built once
            free = Graph(replace(graph.spec, spans=())) if graph.positional else graph
            self._control = MatchedControl(self.model, free, cfg)
        free = self._control.graph
        nodes = Circuit(free, target.sender_receiver_mask) if graph.positional else target
        budgets = self._control.budgets(nodes, by_kind=cfg.random_match == "composition")
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * (t + 1))
        circuit = self._control.draw(budgets, gen)
        if graph.positional:
            circuit = Circuit(graph, circuit.mask[..., None].expand(graph.dense_shape).clone())
        total = W.count_real_parameters(self.model)
        circuit.metadata = {
            "step": t, "top_n": cfg.top_n_at(t, self.graph.n_edges), "mode": "random",
            "random_match": cfg.random_match,
            "discovered_trainable_fraction": trainable_count(self.model, target, cfg) / total,
        }
        circuit.model_name = self.model_name
        return circuit
