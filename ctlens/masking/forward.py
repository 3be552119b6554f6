"""Forward edge masking (`edge_mask`): the model computes the function of a circuit.

The residual stream is a sum, so receiver r's input is ``x_r = sum over senders s before r
of a_s`` (plus constant biases). Ablating every edge outside the circuit means replacing,
for each receiver separately, the contribution of each excluded sender by its reference
value::

    x_r'  =  x_r  +  sum over s upstream of r, (s, r) not in circuit, of  (a_s^ref - a_s)

Per forward pass, sender hooks copy each sender's output ``a_s`` (detached) into one
``[n_senders, batch, pos, d_model]`` buffer, in graph order, so a receiver's upstream
senders are a prefix of it, and keep the live tensors. Each receiver hook then applies one
of two equivalent forms, whichever reads fewer sender rows (chosen once per circuit):

- *excluded form*: ``x_r' = x_r + C_r - coef_r @ A[:n]``, with ``coef_r`` the 0/1 matrix of
  excluded edges into that hook's receivers (trimmed after the last sender group that has
  one) and ``C_r`` the same product on the detached reference;
- *kept form*: ``x_r' = (x_r - S_n) + R_n + K_r @ (A - A^ref)[rows]``, with ``S_n`` the
  live running sum of all ``n`` upstream senders (so ``x_r - S_n`` is the constant biases),
  ``R_n`` the same sum over the reference, and ``K_r`` the circuit's own (kept) edges,
  restricted to the senders that have one. Small circuits read only their own senders.

Reference terms are precomputed once for ``mean`` (zero for ``zero``) and computed once per
forward for ``corrupt``. One matrix product per receiver hook, no loop over edges; hooks
with no excluded edge do nothing. With autograd on, the product is a small custom autograd
function whose backward hands ``coef.T @ grad`` back to the live sender outputs, so
``a_s`` enters live: the gradient through an excluded edge cancels exactly
(d x_r'/d a_s = 1 - 1 = 0) and a model trained under the mask trains the ablated
function, while the shared buffer never enters the autograd graph. Every receiver sees
upstream senders that are themselves computed under the mask: the result is exactly the
model with those edges removed.

MLP neuron groups (``mlp_groups=G``): a grouped MLP reports its hidden activation, and only
the group outputs some hook reads are computed from it (``hidden[..., g] @ W_out[g]``,
live); a running sum over its groups is the hidden activation times all of W_out. Its
receivers get one input for every group without an edge of its own in the hook's matrix
(``x`` in the excluded form, the ablated stream ``x - S_n + R_n`` in the kept form) and a
`ctlens.bridge.mlp_groups.GroupedInput` for the others, so only groups whose input differs
are normed and projected separately. The corrupt reference is recorded for every sender.

Positional circuits (token spans): each excluded (edge, span) pair is ablated at its span's
positions only; the mask needs each batch's span labels (`EdgeMask.set_spans`, or
``spans=`` to `edge_mask`) and keeps its buffer's cells sorted by span
(`ctlens.masking.positional`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Float

from ctlens.bridge.hooks import (
    EdgeHooks,
    eval_mode,
    flat,
    model_device,
    sender_hooks,
)
from ctlens.bridge.mlp_groups import GroupedInput, mlp_parts
from ctlens.circuit import Circuit
from ctlens.data import TaskData
from ctlens.graph import Graph, require_graph_of
from ctlens.masking.plans import HookPlan, MaskPlan
from ctlens.masking.positional import mix_rows, span_coefficients, span_constant
from ctlens.reference import resolve_reference
from ctlens.spans import SpanOrder
from ctlens.types import Ablation, NodeKind


class EdgeMask(EdgeHooks):
    """The handle `edge_mask` yields; it holds the circuit and the ablation reference.

    Methods change what the installed hooks do; they never add or remove hooks.

    - `set_circuit(circuit)`: ablate the edges outside another circuit (same graph).
    - `set_reference(tokens)` (corrupt ablation): record the reference activations of the
      corrupt token ids ``[batch, seq]`` with one no-grad forward (eval mode). Every
      following masked forward must have that same ``[batch, seq]`` shape; call it again
      for each new batch.
    - `set_means(reference)` (mean ablation): recompute the per-position means from a
      `TaskData` or token ids, or take a precomputed ``[n_senders, seq, d_model]`` tensor
      from `ctlens.mean_activations`.
    - `set_spans(labels)` (positional circuits): the ``[batch, seq]`` span labels of the
      next forwards' tokens (`TaskData.spans`); call it again for each new batch.
    - `paused()`: a context inside which forwards run unmasked.
    """

    def __init__(self, model: Any, circuit: Circuit, ablation: Ablation, graph: Graph) -> None:
        """``graph``: the model's graph, checked against it once by the caller (`edge_mask`,
        `ctlens.faithfulness`); every circuit enforced must be of it."""
        super().__init__(model, graph)
        self._order: SpanOrder | None = None  # positional: this batch's cells by span
        self._ref_cells: torch.Tensor | None = None  # the corrupt reference, cells by span
        self.ablation = ablation
        self.device = model_device(model)
        self.dtype = next(model.parameters()).dtype
        self.d_model = int(model.cfg.d_model)
        self._means: Float[torch.Tensor, "n_senders pos d_model"] | None = None
        self._ref: Float[torch.Tensor, "n_senders batch pos d_model"] | None = None
        self._buffer: torch.Tensor | None = None  # this forward's sender outputs (detached)
        self._parts: list[tuple[int, int, torch.Tensor]] = []  # (first row, end row, live)
        self._prefix: dict[int, torch.Tensor] = {}  # n -> live sum of senders 0..n
        self._ref_prefix: dict[int, torch.Tensor] = {}  # n -> sum of reference senders 0..n
        spec = self.graph.spec
        self._w_out = {  # a grouped graph's MLP output projections
            layer: mlp_parts(model, layer).w_out
            for layer in range(spec.n_layers) if spec.mlp_groups > 1
        }
        self._sender_groups = [(0, 1)]
        for layer in range(spec.n_layers):
            heads = self.graph.sender_slice(layer)
            mlp = self.graph.mlp_senders(layer)
            self._sender_groups += [(heads.start, heads.stop), (mlp.start, mlp.stop)]
        self._plan = self.plan(circuit)

    @property
    def circuit(self) -> Circuit:
        """The circuit currently enforced."""
        return self._plan.circuit

    # -------------------------------------------------------------- public controls

    def set_circuit(self, circuit: Circuit) -> None:
        """Ablate every edge outside ``circuit`` from the next forward on."""
        self._plan = self.plan(circuit)

    def set_reference(self, tokens: torch.Tensor) -> torch.Tensor:
        """Corrupt ablation: record ``a^ref`` from a no-grad, eval-mode forward on ``tokens``.

        Returns that forward's logits (the corrupt run: every edge ablated).
        """
        if self.ablation is not Ablation.CORRUPT:
            hint = " (use set_means)" if self.ablation is Ablation.MEAN else ""
            raise ValueError(
                f"set_reference is for corrupt ablation; this mask uses "
                f"{self.ablation.value!r}{hint}"
            )
        if tokens is None:
            raise TypeError("set_reference needs the corrupt token ids [batch, seq], got None")
        checked = resolve_reference(self.model, self.graph, None, Ablation.CORRUPT, tokens, None)
        assert checked[0] is not None
        tokens = checked[0].long()
        b, p = tokens.shape
        buffer = torch.zeros(
            self.graph.n_senders, b, p, self.d_model, device=self.device, dtype=self.dtype
        )

        def record(rows: slice, act: torch.Tensor) -> None:
            buffer[rows] += flat(act.detach()).permute(2, 0, 1, 3).to(buffer.dtype)

        hooks = sender_hooks(self.model, self.graph, record)
        with torch.no_grad(), eval_mode(self.model), self.paused(), self.model.hooks(hooks):
            logits = self.model(tokens.to(self.device))
        self._ref = buffer
        self._ref_cells = None  # sorted by span by the next forward of a positional mask
        running = torch.zeros_like(buffer[0])
        self._ref_prefix = {}
        for start, stop in self._sender_groups:
            running = running + buffer[start:stop].sum(0)
            self._ref_prefix[stop] = running
        return logits

    def set_means(self, reference: TaskData | torch.Tensor, batch_size: int | None = 32) -> None:
        """Mean ablation: (re)compute or set the per-position mean sender activations.

        ``reference`` is read by `ctlens.attribution.resolve_reference`, as everywhere.
        """
        if self.ablation is not Ablation.MEAN:
            raise ValueError(
                f"set_means is for mean ablation; this mask uses {self.ablation.value!r}"
            )
        _, means = resolve_reference(
            self.model, self.graph, None, Ablation.MEAN, reference, batch_size
        )
        assert means is not None
        self._means = means.detach().to(self.device, self.dtype)
        self._plan = self.plan(self._plan.circuit)

    def set_spans(self, labels: torch.Tensor) -> None:
        """Positional circuits: the span label of each token of the next forwards
        (``[batch, seq]``, as `TaskData.spans`; -1 on padding)."""
        if not self.graph.positional:
            raise ValueError("set_spans is for positional circuits; this circuit has no spans")
        labels = torch.as_tensor(labels, device=self.device).long()
        if labels.ndim != 2 or bool(((labels < -1) | (labels >= self.graph.n_spans)).any()):
            raise ValueError(f"span labels must be [batch, seq] indices into the circuit's "
                             f"spans {list(self.graph.spans)} (-1 on padding)")
        self._order = SpanOrder(labels, self.graph.n_spans)
        self._ref_cells = None  # sorted again by the next forward

    # -------------------------------------------------------------- planning

    def plan(self, circuit: Circuit) -> MaskPlan:
        """Precompute, per receiver hook, the excluded-edge matrix and reference constant."""
        if not isinstance(circuit, Circuit):
            raise TypeError(f"circuit must be a ctlens.Circuit, got {type(circuit).__name__}")
        graph = self.graph
        if circuit.graph != graph:
            raise ValueError(
                f"the circuit belongs to another model's graph ({circuit.graph!r}); this "
                f"model has {graph!r}. Use a circuit found on this model."
            )
        excluded = graph.dense_valid & ~circuit.mask  # [S, R] or [S, R, spans]
        groups: dict[int, HookPlan] = {}
        columns_list = [
            graph.receiver_slice(layer, kind)
            for layer in range(graph.spec.n_layers)
            for kind in (NodeKind.Q, NodeKind.K, NodeKind.V, NodeKind.MLP)
        ]
        columns_list.append(slice(graph.n_receivers - 1, graph.n_receivers))
        for columns in columns_list:
            n_up = graph.upstream[columns.start]
            block = excluded[:n_up, columns]
            dropped = block.flatten(1).any(1).nonzero()[:, 0]
            if not len(dropped):
                groups[columns.start] = HookPlan("none", n_up, None, 0, None, None, {})
                continue
            n_excluded = self._group_end(int(dropped.max()))
            kept = circuit.mask[:n_up, columns]
            kept_rows = kept.flatten(1).any(1).nonzero()[:, 0]
            if len(kept_rows) + 2 < n_excluded:
                plan = self._kept_plan(n_up, kept, kept_rows)
            else:
                plan = self._excluded_plan(n_up, block, n_excluded)
            if columns.stop - columns.start > 1 and columns == self._mlp_columns(columns):
                plan = self._grouped_plan(plan)
            groups[columns.start] = plan
        n_rows = max(
            (self._group_end(int(g.rows.max())) if g.rows is not None and len(g.rows) else g.n_rows)
            if g.kind != "none"
            else 0
            for g in groups.values()
        )
        n_prefix = max((g.n_upstream for g in groups.values() if g.kind == "kept"), default=0)
        computed = self._computed(groups.values())
        for start, g in groups.items():
            if g.kind != "none":
                rows = range(g.n_rows) if g.rows is None else g.rows.tolist()
                groups[start] = replace(g, maps=self._maps(list(rows), computed))
        return MaskPlan(circuit, groups, n_rows, n_prefix, computed)

    def _mlp_columns(self, columns: slice) -> slice | None:
        """The grouped MLP receiver columns ``columns`` starts, if any."""
        if self.graph.spec.mlp_groups == 1 or columns.start >= self.graph.n_receivers - 1:
            return None
        layer = self.graph.receiver_nodes[columns.start].layer
        assert layer is not None
        return self.graph.receiver_slice(layer, NodeKind.MLP)

    def _computed(self, plans: Any) -> dict[int, torch.Tensor]:
        """For each grouped MLP layer, the groups whose output some hook reads."""
        if self.graph.spec.mlp_groups == 1:
            return {}
        read = torch.zeros(self.graph.n_senders, dtype=torch.bool)
        for g in plans:
            if g.kind == "none":
                continue
            if g.rows is None:
                read[: g.n_rows] = True
            else:
                read[g.rows.cpu()] = True
        computed = {}
        for layer in self._w_out:
            chosen = read[self.graph.mlp_senders(layer)].nonzero()[:, 0]
            if len(chosen):
                computed[layer] = chosen.to(self.device)
        return computed

    def _maps(
        self, rows: list[int], computed: dict[int, torch.Tensor]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
        """For each sender group: positions in ``rows`` of its rows and their index in its
        live activation (a grouped MLP's holds only its ``computed`` groups)."""
        maps: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        grouped = {self.graph.mlp_senders(layer).start: layer for layer in computed}
        for start, stop in self._sender_groups:
            local_of = {r: r - start for r in range(start, stop)}
            if start in grouped:
                chosen = computed[grouped[start]].tolist()
                local_of = {start + g: k for k, g in enumerate(chosen)}
            hits = [(k, local_of[r]) for k, r in enumerate(rows) if start <= r < stop]
            if hits:
                positions = torch.tensor([k for k, _ in hits])
                local = torch.tensor([j for _, j in hits])
                maps[start] = (positions, local, len(local_of))
        return maps

    def _excluded_plan(self, n_up: int, block: torch.Tensor, n_rows: int) -> HookPlan:
        coef_t = span_coefficients(block[:n_rows]).contiguous().to(self.device, self.dtype)
        const = None
        if self.ablation is Ablation.MEAN and self._means is not None:
            const = torch.einsum("...cs,spd->...cpd", coef_t, self._means[:n_rows])
        return HookPlan("excluded", n_up, None, n_rows, coef_t, const, {})

    def _kept_plan(self, n_up: int, kept: torch.Tensor, rows: torch.Tensor) -> HookPlan:
        coef_t = span_coefficients(kept[rows]).contiguous().to(self.device, self.dtype)
        const = None
        if self.ablation is Ablation.MEAN and self._means is not None:
            means = self._means
            const = means[:n_up].sum(0) - torch.einsum("...cs,spd->...cpd", coef_t, means[rows])
        return HookPlan("kept", n_up, rows.to(self.device), len(rows), coef_t, const, {})

    def _grouped_plan(self, plan: HookPlan) -> HookPlan:
        """A grouped MLP hook's plan: only the groups (columns) with an edge in its matrix
        get inputs of their own; the rest read the common input (module docstring)."""
        assert plan.coef_t is not None
        cols = plan.coef_t.ndim - 2  # the columns' axis (a positional plan: after the spans)
        special = plan.coef_t.any(-1).view(-1, plan.coef_t.shape[cols]).any(0).nonzero()[:, 0]
        const = None if plan.const is None else plan.const.index_select(cols, special)
        common = None
        if plan.kind == "kept" and self.ablation is Ablation.MEAN and self._means is not None:
            common = self._means[: plan.n_upstream].sum(0)
        return replace(plan, coef_t=plan.coef_t.index_select(cols, special), const=const,
                       special=special, common=common)

    def _group_end(self, row: int) -> int:
        """End of the sender group (input, a layer's heads, an MLP or its neuron groups) holding
        ``row``, so that a hook reads whole groups and each live activation maps to whole
        buffer rows."""
        if row == 0:
            return 1
        heads = self.graph.spec.n_heads
        per_layer = heads + self.graph.spec.mlp_groups
        layer, offset = divmod(row - 1, per_layer)
        return 1 + layer * per_layer + (heads if offset < heads else per_layer)

    def use(self, plan: MaskPlan) -> None:
        """Enforce a plan made by `plan` (lets callers switch circuits without replanning)."""
        self._plan = plan

    # -------------------------------------------------------------- hooks

    def _on_sender(self, rows: slice, act: torch.Tensor) -> None:
        plan = self._plan
        if self._paused or not plan.active:
            return
        first_input = rows.start == 0 and self._new_forward
        if first_input:
            self._new_forward = False
            self._start_forward(act)
        if rows.start < plan.n_prefix:  # running sum of the live sender outputs
            total = act if act.ndim == 3 else act.sum(2)
            if rows.start == 0:
                self._prefix[1] = total if first_input else self._prefix[1] + total
            else:
                self._prefix[rows.stop] = self._prefix[rows.start] + total
        if rows.start >= plan.n_rows:
            return
        buffer = self._buffer
        assert buffer is not None
        with torch.no_grad():
            if rows.start == 0 and not first_input:
                buffer[0] += self._cells(act[None])[0]  # the position embedding joins in
            else:
                buffer[rows] = self._cells(flat(act).permute(2, 0, 1, 3))
        if act.requires_grad:
            self._parts.append((rows.start, rows.stop, act))

    def _start_forward(self, act: torch.Tensor) -> None:
        b, p = act.shape[:2]
        if self.ablation is Ablation.CORRUPT:
            if self._ref is None:
                raise RuntimeError(
                    "corrupt ablation has no reference activations: pass reference=<corrupt "
                    "token ids> to edge_mask, or call mask.set_reference(corrupt_tokens) "
                    "before each batch"
                )
            if tuple(self._ref.shape[1:3]) != (b, p):
                raise RuntimeError(
                    f"the corrupt reference was recorded for [batch, seq] = "
                    f"{list(self._ref.shape[1:3])} but this forward has {[b, p]}; call "
                    "mask.set_reference(corrupt_tokens) with this batch's corrupt tokens"
                )
        elif self.ablation is Ablation.MEAN:
            assert self._means is not None
            if p > self._means.shape[1]:
                raise RuntimeError(
                    f"the mean reference covers {self._means.shape[1]} positions but this "
                    f"forward has {p}; call mask.set_means(...) with prompts at least as long"
                )
        self._parts = []
        self._prefix = {}
        shape: tuple[int, ...] = (self._plan.n_rows, b, p, self.d_model)
        if self.graph.positional:
            if self._order is None or self._order.shape != (b, p):
                got = "none" if self._order is None else list(self._order.shape)
                raise RuntimeError(f"a positional circuit needs this forward's span labels "
                                   f"([batch, seq] = {[b, p]}; set for {got}): call "
                                   "mask.set_spans(batch.spans) for each batch")
            if self._ref is not None and self._ref_cells is None:
                self._ref_cells = self._order.sorted_cells(self._ref)
            shape = (self._plan.n_rows, self._order.bounds[-1], self.d_model)
        old = self._buffer  # holds detached copies only, so no autograd graph needs it
        if old is None or tuple(old.shape) != shape or old.dtype != act.dtype:
            self._buffer = torch.empty(shape, device=act.device, dtype=act.dtype)

    def _on_hidden(self, layer: int, post: torch.Tensor) -> None:
        """A grouped MLP's hidden activation: its running sum, and the group outputs some
        hook reads (live, into the buffer rows of those groups)."""
        plan = self._plan
        if self._paused or not plan.active:
            return
        rows = self.graph.mlp_senders(layer)
        w_out = self._w_out[layer]
        if rows.start < plan.n_prefix:
            self._prefix[rows.stop] = self._prefix[rows.start] + post @ w_out.to(post.dtype)
        chosen = plan.computed.get(layer)
        if chosen is None or rows.start >= plan.n_rows:
            return
        groups = self.graph.spec.mlp_groups
        weights = w_out.reshape(groups, -1, w_out.shape[1]).index_select(0, chosen)
        hidden = post.unflatten(-1, (groups, -1)).index_select(2, chosen)
        act = torch.einsum("bpsw,swd->bpsd", hidden, weights.to(post.dtype))  # [b, p, S, d]
        assert self._buffer is not None
        with torch.no_grad():
            self._buffer.index_copy_(0, rows.start + chosen, self._cells(act.permute(2, 0, 1, 3)))
        if act.requires_grad:
            self._parts.append((rows.start, rows.stop, act))

    def _on_receiver(
        self, columns: slice, n_up: int, x: torch.Tensor
    ) -> torch.Tensor | GroupedInput:
        if self._paused:
            return x
        group = self._plan.groups[columns.start]
        if group.kind == "none":
            return x
        live, const = self._terms(group, *x.shape[:2])
        if group.special is not None:
            return self._grouped_input(group, x, live, const)
        # update x in place: it is a fresh tensor (the bridge forks q/k/v inputs, and
        # receiver_hooks copies the MLP and logits inputs), so no one else reads it
        view = x.unsqueeze(0) if x.ndim == 3 else x.permute(2, 0, 1, 3)  # [cols, b, p, d]
        if group.kind == "excluded":
            view.sub_(live)
        else:
            view.sub_(self._prefix[group.n_upstream]).add_(live)
        if isinstance(const, torch.Tensor):
            view.add_(const)
        return x

    def _terms(
        self, group: HookPlan, b: int, p: int
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``coef_t @ A[rows]`` (live) and the reference constant of each of the hook's
        columns (``[cols, b, p, d]``; the constant 0.0 under zero ablation)."""
        assert self._buffer is not None and group.coef_t is not None
        ref = self._ref if self._order is None else self._ref_cells
        if group.rows is None:
            rows = self._buffer[: group.n_rows]
            ref_rows = None if ref is None else ref[: group.n_rows]
        else:
            rows = self._buffer.index_select(0, group.rows)
            ref_rows = None if ref is None else ref.index_select(0, group.rows)
        parts = [part for part in self._parts if part[0] in group.maps]
        maps = [group.maps[start] for start, _, _ in parts]
        live = mix_rows(group.coef_t, self._order, rows, maps, [a for *_, a in parts])
        const: torch.Tensor | float = 0.0
        if self.ablation is Ablation.CORRUPT:
            assert ref_rows is not None
            with torch.no_grad():
                const = mix_rows(group.coef_t, self._order, ref_rows.to(live.dtype), [], [])
                if group.kind == "kept":
                    const = self._ref_prefix[group.n_upstream][None].to(live.dtype) - const
        elif self.ablation is Ablation.MEAN:
            assert group.const is not None
            const = (group.const[:, None, :p] if self._order is None
                     else span_constant(group.const, self._order.labels)).to(live.dtype)
        return live, const

    def _cells(self, rows: Float[torch.Tensor, "m batch pos d_model"]) -> torch.Tensor:
        """Sender rows as the buffer holds them: as they are, or their cells sorted by span."""
        return rows if self._order is None else self._order.sorted_cells(rows)

    def _grouped_input(
        self, group: HookPlan, x: torch.Tensor, live: torch.Tensor, const: torch.Tensor | float
    ) -> GroupedInput:
        """A grouped MLP's inputs: ``group.special`` groups read their own (as `_on_receiver`
        computes one column's), the others the input every group would read without an edge
        of its own in the matrix (``x`` excluded, ``x - S_n + R_n`` kept)."""
        common = x
        if group.kind == "kept":
            base = x - self._prefix[group.n_upstream]
            own = base[None] + live
            common = base
            if self.ablation is Ablation.CORRUPT:
                common = base + self._ref_prefix[group.n_upstream].to(x.dtype)
            elif group.common is not None:
                common = base + group.common[: x.shape[1]].to(x.dtype)
        else:
            own = x[None] - live
        own = own + const
        return GroupedInput(common, group.special, own.permute(1, 2, 0, 3))


@contextlib.contextmanager
def edge_mask(
    model: Any,
    circuit: Circuit,
    ablation: str | Ablation = "mean",
    reference: TaskData | torch.Tensor | None = None,
    batch_size: int | None = 32,
    spans: torch.Tensor | None = None,
) -> Iterator[EdgeMask]:
    """Inside: ``model`` computes the function with every edge outside ``circuit`` ablated.

    Gradients still flow (sender activations enter live, references detached), so a model
    can be trained under the mask. See the module docstring for the algorithm.

    Args:
        model: a bridge from `ctlens.load_model`.
        circuit: the edges to keep; a `Circuit` of this model's graph.
        ablation: ``"mean"``, ``"zero"`` or ``"corrupt"``.
        reference: read by `ctlens.attribution.resolve_reference`, the same resolver
            `ctlens.attribute` and `ctlens.faithfulness` use. ``mean``: a `TaskData` or token
            ids ``[n, seq]`` to average over, or the ``[n_senders, seq, d_model]`` output of
            `ctlens.mean_activations`; required, because where `attribute` defaults to the
            task's clean prompts, a mask has no task data (the error says what to pass).
            ``corrupt``: the corrupt token ids ``[batch, seq]`` of the first batch, or
            ``None`` and call ``mask.set_reference(tokens)`` before each forward.
            ``zero``: must be ``None``.
        batch_size: batch size for computing means from a `TaskData` or token ids.
        spans: a positional circuit's span labels ``[batch, seq]`` for the first batch
            (`TaskData.spans`), or ``None`` and call ``mask.set_spans(labels)`` before each
            forward. Each excluded (edge, span) pair is ablated at its span's positions.

    Yields:
        An `EdgeMask` handle (``set_circuit``, ``set_reference``, ``set_means``,
        ``paused``).

    What it changes, and restores on exit (also when the body raises): it adds forward
    hooks to the sender-output and receiver-input hook points and removes exactly those.
    It does not touch parameters, ``requires_grad`` or the train/eval mode (the corrupt
    reference forward runs in eval mode and restores the mode).
    """
    ablation = Ablation.parse(ablation)
    mask = EdgeMask(model, circuit, ablation, circuit_graph(model, circuit))
    if spans is not None:
        mask.set_spans(spans)
    corrupt, means = resolve_reference(model, mask.graph, None, ablation, reference, batch_size)
    if means is not None:
        mask.set_means(means)
    if corrupt is not None:
        mask.set_reference(corrupt)
    with model.hooks(fwd_hooks=mask.hooks()):
        yield mask



def circuit_graph(model: Any, circuit: Circuit) -> Graph:
    """The graph of ``circuit``, a `Circuit` of ``model``: the one check of a circuit against
    its model that the entry points taking one make (`edge_mask`, `ctlens.faithfulness`,
    `ctlens.masking.rules.rule_openings`); nothing is rebuilt."""
    if not isinstance(circuit, Circuit):
        raise TypeError(f"circuit must be a ctlens.Circuit, got {type(circuit).__name__}")
    return require_graph_of(model, circuit.graph)


__all__ = ["EdgeMask", "circuit_graph", "edge_mask"]
