"""Enforce a circuit on a model: forward edge ablation, faithfulness and gradient restriction.

**Forward edge masking** (`edge_mask`). The residual stream is a sum, so receiver r's input
is ``x_r = sum over senders s before r of a_s`` (plus constant biases). Ablating every edge
outside the circuit means replacing, for each receiver separately, the contribution of each
excluded sender by its reference value::

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

**Faithfulness** (`faithfulness`, `faithfulness_curve`) uses the same machinery: per batch,
one plain forward (M_full), one masked forward per circuit, and one with the empty circuit
(M_empty); faithfulness = (M_circuit - M_empty) / (M_full - M_empty) with every M the mean
metric over the dataset. The curve uses MIB's grid (0.1 ... 100 % of valid edges, top-N by
|score|, ``int(fraction * n_edges)`` edges, at least 1) and MIB's areas: with x the
fraction of edges and f the faithfulness at each grid point, CPR = sum of trapezoids
``(x_{i+1} - x_i) (f_i + f_{i+1}) / 2`` and CMD = the same over ``|1 - f|``. The
integration starts at the first grid point (0.001), not at 0, exactly as MIB's evaluation
does; x is not rescaled.

**Gradient restriction** (`restrict_gradients`) lets only the parameters of circuit nodes
change, slice by slice: a head that sends along a circuit edge -> its rows/columns of W_O;
a q (k, v) receiver -> its head's (KV head's) slice of W_Q (W_K, W_V) and bias; b_O when any
head of that layer sends; an MLP sender -> W_out, b_out; an MLP receiver -> W_in, the gate
and b_in; ``input`` -> token and position embeddings and ``logits`` -> the unembedding only
when asked; LayerNorms never. Gradients of frozen slices are zeroed by tensor hooks and,
given the optimizer, frozen slices are copied back after every ``step`` (a step post-hook),
so they stay bit-identical under momentum and weight decay. The parameter map is read from
the bridge's components (``blocks[l].attn.q/k/v/o``, ``blocks[l].mlp.in/gate/out``,
``embed``, ``pos_embed``, ``unembed``): ``nn.Linear`` weights are ``[out, in]`` and GPT-2's
``Conv1D`` weights ``[in, out]``. On GPT-2 the bridge's q/k/v weights are strided views of
the fused ``c_attn`` parameter; the views are what receive gradients, so they are the ones
sliced, and the fused parameter (which shares their storage) is left alone.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import nn

from ctlens.attribution import mean_activations, resolve_reference
from ctlens.circuit import Circuit
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.hooks import (
    HookLayout,
    eval_mode,
    flat,
    model_device,
    receiver_hooks,
    sender_hooks,
)
from ctlens.types import Ablation, NodeKind

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""MIB's circuit-size grid, as fractions of the valid edges (0.1 % ... 100 %)."""


# ============================================================================ forward masking


class _LiveSum(torch.autograd.Function):
    """``coef_t @ rows`` where ``rows`` holds detached copies of live sender outputs.

    Forward: one matrix product on rows of the shared buffer. Backward: ``coef_t.T @ grad``
    gives the gradient of every row used; each live activation gets its rows back, reshaped
    to its own layout. The buffer never enters the autograd graph, so no in-place write into
    it is recorded and the backward costs one product per hook.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        coef_t: torch.Tensor,
        rows: torch.Tensor,
        maps: list[tuple[torch.Tensor, torch.Tensor, int]],
        *acts: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(coef_t)
        ctx.maps = maps
        ctx.layout = [(act.shape, act.ndim) for act in acts]
        ctx.rows_shape = rows.shape
        return coef_t @ rows.reshape(rows.shape[0], rows[0].numel() if len(rows) else 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (coef_t,) = ctx.saved_tensors
        rows_grad = (coef_t.T @ grad).view(ctx.rows_shape)  # [m, batch, pos, d_model]
        grads: list[torch.Tensor | None] = [None, None, None]
        for (positions, local, n_local), (shape, ndim) in zip(ctx.maps, ctx.layout, strict=True):
            if len(local) == n_local:  # every row of this sender group was used, in order
                g = rows_grad[positions[0] : positions[0] + n_local]
            else:
                g = rows_grad.new_zeros((n_local, *rows_grad.shape[1:]))
                g[local] = rows_grad[positions]
            g = g[0] if ndim == 3 else g.permute(1, 2, 0, 3)
            grads.append(g.sum_to_size(shape) if tuple(g.shape) != tuple(shape) else g)
        return tuple(grads)


@dataclass(frozen=True)
class _GroupPlan:
    """Precomputed ablation for one receiver hook (a group of receiver columns).

    Two equivalent forms; `EdgeMask.plan` picks the one that reads fewer sender rows:

    - ``excluded``: ``x' = x + C - coef_t @ A[:n]`` with ``coef_t`` the excluded edges and
      ``rows`` the prefix ``0..n``;
    - ``kept``: ``x' = x - S_n + C + coef_t @ A[rows]`` with ``coef_t`` the circuit's (kept)
      edges, ``rows`` the senders that have one, and ``S_n`` the live sum of all ``n``
      upstream senders. Because ``x - S_n`` is the constant biases, this equals the
      excluded form; it reads only the circuit's rows, which is cheap for small circuits.
    """

    kind: str  # "none", "excluded" or "kept"
    n_upstream: int  # senders this hook may read (a prefix of the sender list)
    rows: torch.Tensor | None  # sender rows used (None: the prefix 0..n_rows)
    n_rows: int
    coef_t: torch.Tensor | None  # [n_cols, n_rows] 0/1, model dtype
    const: torch.Tensor | None  # mean ablation: [n_cols, pos, d_model]
    maps: dict[int, tuple[torch.Tensor, torch.Tensor, int]]  # sender group start -> rows


@dataclass(frozen=True)
class _Plan:
    """Everything the hooks need to enforce one circuit."""

    circuit: Circuit
    groups: dict[int, _GroupPlan]  # first receiver column of the hook -> plan
    n_rows: int  # buffer rows any hook reads
    n_prefix: int  # senders whose running sum a "kept" hook needs (0: none)

    @property
    def active(self) -> bool:
        return self.n_rows > 0 or self.n_prefix > 0


class EdgeMask:
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
    - `paused()`: a context inside which forwards run unmasked.
    """

    def __init__(self, model: Any, circuit: Circuit, ablation: Ablation) -> None:
        self.model = model
        self.graph = Graph.from_model(model)
        self.ablation = ablation
        self.device = model_device(model)
        self.dtype = next(model.parameters()).dtype
        self.d_model = int(model.cfg.d_model)
        self._means: Float[torch.Tensor, "n_senders pos d_model"] | None = None
        self._ref: Float[torch.Tensor, "n_senders batch pos d_model"] | None = None
        self._buffer: torch.Tensor | None = None  # this forward's sender outputs (detached)
        self._parts: list[tuple[int, int, torch.Tensor]] = []  # (first row, end row, live)
        self._new_forward = False
        self._paused = False
        self._prefix: dict[int, torch.Tensor] = {}  # n -> live sum of senders 0..n
        self._ref_prefix: dict[int, torch.Tensor] = {}  # n -> sum of reference senders 0..n
        spec = self.graph.spec
        self._sender_groups = [(0, 1)]
        for layer in range(spec.n_layers):
            heads = self.graph.sender_slice(layer)
            mlp = self.graph.mlp_sender(layer)
            self._sender_groups += [(heads.start, heads.stop), (mlp, mlp + 1)]
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
        tokens = _check_tokens(tokens, self.model, "the corrupt reference")
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
        running = torch.zeros_like(buffer[0])
        self._ref_prefix = {}
        for start, stop in self._sender_groups:
            running = running + buffer[start:stop].sum(0)
            self._ref_prefix[stop] = running
        return logits

    def set_means(self, reference: TaskData | torch.Tensor, batch_size: int | None = 32) -> None:
        """Mean ablation: (re)compute or set the per-position mean sender activations."""
        if self.ablation is not Ablation.MEAN:
            raise ValueError(
                f"set_means is for mean ablation; this mask uses {self.ablation.value!r}"
            )
        if isinstance(reference, torch.Tensor) and reference.dtype.is_floating_point:
            expected = (self.graph.n_senders, self.d_model)
            if reference.ndim != 3 or (reference.shape[0], reference.shape[2]) != expected:
                raise ValueError(
                    f"precomputed means must be [n_senders={expected[0]}, seq, "
                    f"d_model={expected[1]}] (from ctlens.mean_activations), got "
                    f"{tuple(reference.shape)}"
                )
            means = reference
        elif isinstance(reference, (TaskData, torch.Tensor)):
            means = mean_activations(self.model, reference, batch_size)
        else:
            raise TypeError(
                "mean ablation needs reference=<TaskData>, token ids [n, seq] or precomputed "
                f"means from ctlens.mean_activations; got {type(reference).__name__}"
            )
        self._means = means.detach().to(self.device, self.dtype)
        self._plan = self.plan(self._plan.circuit)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside: forwards run unmasked (the hooks stay installed but do nothing)."""
        before = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = before

    def hooks(self) -> list[tuple[str, Any]]:
        """The ``(hook_name, fn)`` pairs this mask needs: sender outputs, receiver inputs."""
        first_input = HookLayout.from_model(self.model).input_hooks[0]
        hooks: list[tuple[str, Any]] = []
        for name, fn in sender_hooks(self.model, self.graph, self._on_sender):
            if name == first_input:
                fn = self._marks_new_forward(fn)
            hooks.append((name, fn))
        hooks += receiver_hooks(self.model, self.graph, self._on_receiver)
        return hooks

    # -------------------------------------------------------------- planning

    def plan(self, circuit: Circuit) -> _Plan:
        """Precompute, per receiver hook, the excluded-edge matrix and reference constant."""
        if not isinstance(circuit, Circuit):
            raise TypeError(f"circuit must be a ctlens.Circuit, got {type(circuit).__name__}")
        graph = self.graph
        if circuit.graph != graph:
            raise ValueError(
                f"the circuit belongs to another model's graph ({circuit.graph!r}); this "
                f"model has {graph!r}. Use a circuit found on this model."
            )
        excluded = graph.valid & ~circuit.mask
        groups: dict[int, _GroupPlan] = {}
        columns_list = [
            graph.receiver_slice(layer, kind)
            for layer in range(graph.spec.n_layers)
            for kind in (NodeKind.Q, NodeKind.K, NodeKind.V, NodeKind.MLP)
        ]
        columns_list.append(slice(graph.n_receivers - 1, graph.n_receivers))
        for columns in columns_list:
            n_up = graph.upstream[columns.start]
            block = excluded[:n_up, columns]
            dropped = block.any(1).nonzero()[:, 0]
            if not len(dropped):
                groups[columns.start] = _GroupPlan("none", n_up, None, 0, None, None, {})
                continue
            n_excluded = self._group_end(int(dropped.max()))
            kept = circuit.mask[:n_up, columns]
            kept_rows = kept.any(1).nonzero()[:, 0]
            if len(kept_rows) + 2 < n_excluded:
                groups[columns.start] = self._kept_plan(n_up, kept, kept_rows)
            else:
                groups[columns.start] = self._excluded_plan(n_up, block, n_excluded)
        n_rows = max(
            (self._group_end(int(g.rows.max())) if g.rows is not None and len(g.rows) else g.n_rows)
            if g.kind != "none"
            else 0
            for g in groups.values()
        )
        n_prefix = max((g.n_upstream for g in groups.values() if g.kind == "kept"), default=0)
        return _Plan(circuit, groups, n_rows, n_prefix)

    def _maps(self, rows: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, int]]:
        """For each sender group: positions in ``rows`` of its rows and their local index."""
        maps: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for start, stop in self._sender_groups:
            hits = [(k, r - start) for k, r in enumerate(rows) if start <= r < stop]
            if hits:
                positions = torch.tensor([k for k, _ in hits])
                local = torch.tensor([j for _, j in hits])
                maps[start] = (positions, local, stop - start)
        return maps

    def _excluded_plan(self, n_up: int, block: torch.Tensor, n_rows: int) -> _GroupPlan:
        coef_t = block[:n_rows].T.contiguous().to(self.device, self.dtype)
        const = None
        if self.ablation is Ablation.MEAN and self._means is not None:
            const = torch.einsum("cs,spd->cpd", coef_t, self._means[:n_rows])
        return _GroupPlan(
            "excluded", n_up, None, n_rows, coef_t, const, self._maps(list(range(n_rows)))
        )

    def _kept_plan(self, n_up: int, kept: torch.Tensor, rows: torch.Tensor) -> _GroupPlan:
        coef_t = kept[rows].T.contiguous().to(self.device, self.dtype)
        const = None
        if self.ablation is Ablation.MEAN and self._means is not None:
            means = self._means
            const = means[:n_up].sum(0)[None] - torch.einsum("cs,spd->cpd", coef_t, means[rows])
        return _GroupPlan(
            "kept", n_up, rows.to(self.device), len(rows), coef_t, const, self._maps(rows.tolist())
        )

    def _group_end(self, row: int) -> int:
        """End of the sender group (input, a layer's heads, an MLP) holding ``row``, so that
        a hook reads whole groups and each live activation maps to whole buffer rows."""
        if row == 0:
            return 1
        per_layer = self.graph.spec.n_heads + 1
        layer, offset = divmod(row - 1, per_layer)
        return (
            1
            + layer * per_layer
            + (self.graph.spec.n_heads if offset < per_layer - 1 else per_layer)
        )

    def use(self, plan: _Plan) -> None:
        """Enforce a plan made by `plan` (lets callers switch circuits without replanning)."""
        self._plan = plan

    # -------------------------------------------------------------- hooks

    def _marks_new_forward(self, fn: Any) -> Any:
        def hook(activation: torch.Tensor, hook: Any) -> Any:
            self._new_forward = True
            return fn(activation, hook)

        return hook

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
                buffer[0] += act  # the position embedding joins the token embedding
            else:
                buffer[rows] = flat(act).permute(2, 0, 1, 3)
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
        shape = (self._plan.n_rows, b, p, self.d_model)
        old = self._buffer  # holds detached copies only, so no autograd graph needs it
        if old is None or tuple(old.shape) != shape or old.dtype != act.dtype:
            self._buffer = torch.empty(shape, device=act.device, dtype=act.dtype)

    def _on_receiver(self, columns: slice, n_up: int, x: torch.Tensor) -> torch.Tensor:
        if self._paused:
            return x
        group = self._plan.groups[columns.start]
        if group.kind == "none":
            return x
        assert self._buffer is not None and group.coef_t is not None
        b, p = x.shape[:2]
        n = group.n_rows
        if group.rows is None:
            rows = self._buffer[:n]
            ref_rows = None if self._ref is None else self._ref[:n]
        else:
            rows = self._buffer.index_select(0, group.rows)
            ref_rows = None if self._ref is None else self._ref.index_select(0, group.rows)
        parts = [part for part in self._parts if part[0] in group.maps]
        if parts and torch.is_grad_enabled():
            maps = [group.maps[start] for start, _, _ in parts]
            product = _LiveSum.apply(group.coef_t, rows, maps, *[a for *_, a in parts])
        else:
            product = group.coef_t @ rows.reshape(n, b * p * self.d_model)
        live = product.view(-1, b, p, self.d_model)  # [cols, batch, pos, d_model]
        const: torch.Tensor | float = 0.0
        if self.ablation is Ablation.CORRUPT:
            assert ref_rows is not None
            with torch.no_grad():
                ref_flat = ref_rows.reshape(n, b * p * self.d_model).to(live.dtype)
                const = (group.coef_t @ ref_flat).view_as(live)
                if group.kind == "kept":
                    const = self._ref_prefix[group.n_upstream][None].to(live.dtype) - const
        elif self.ablation is Ablation.MEAN:
            assert group.const is not None
            const = group.const[:, None, :p].to(live.dtype)
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


@contextlib.contextmanager
def edge_mask(
    model: Any,
    circuit: Circuit,
    ablation: str | Ablation = "mean",
    reference: TaskData | torch.Tensor | None = None,
    batch_size: int | None = 32,
) -> Iterator[EdgeMask]:
    """Inside: ``model`` computes the function with every edge outside ``circuit`` ablated.

    Gradients still flow (sender activations enter live, references detached), so a model
    can be trained under the mask. See the module docstring for the algorithm.

    Args:
        model: a bridge from `ctlens.load_model`.
        circuit: the edges to keep; a `Circuit` of this model's graph.
        ablation: ``"mean"``, ``"zero"`` or ``"corrupt"``.
        reference: ``mean``: a `TaskData` or token ids ``[n, seq]`` to average over, or the
            ``[n_senders, seq, d_model]`` output of `ctlens.mean_activations` (required).
            ``corrupt``: the corrupt token ids ``[batch, seq]`` of the first batch, or
            ``None`` and call ``mask.set_reference(tokens)`` before each forward.
            ``zero``: must be ``None``.
        batch_size: batch size for computing means from a `TaskData` or token ids.

    Yields:
        An `EdgeMask` handle (``set_circuit``, ``set_reference``, ``set_means``,
        ``paused``).

    What it changes, and restores on exit (also when the body raises): it adds forward
    hooks to the sender-output and receiver-input hook points and removes exactly those.
    It does not touch parameters, ``requires_grad`` or the train/eval mode (the corrupt
    reference forward runs in eval mode and restores the mode).
    """
    ablation = Ablation.parse(ablation)
    mask = EdgeMask(model, circuit, ablation)
    if ablation is Ablation.ZERO:
        if reference is not None:
            raise ValueError("zero ablation takes no reference; drop the reference argument")
    elif ablation is Ablation.MEAN:
        if reference is None:
            raise ValueError(
                "mean ablation needs a reference: pass reference=<TaskData or token ids to "
                "average over> or reference=ctlens.mean_activations(model, data)"
            )
        mask.set_means(reference, batch_size)
    elif reference is not None:
        if isinstance(reference, TaskData):
            raise TypeError(
                "corrupt ablation takes the corrupt token ids as reference (e.g. data.corrupt), "
                "not a TaskData"
            )
        mask.set_reference(reference)
    with model.hooks(fwd_hooks=mask.hooks()):
        yield mask


# ============================================================================ faithfulness


@dataclass(frozen=True)
class FaithfulnessResult:
    """The result of `faithfulness`.

    ``faithfulness`` is ``(metric_circuit - metric_empty) / (metric_full - metric_empty)``;
    each metric is the mean over all examples. NaN when ``metric_full == metric_empty``.
    """

    faithfulness: float
    metric_circuit: float
    metric_full: float
    metric_empty: float
    n_edges: int
    n_total_edges: int
    n_examples: int
    ablation: str


@dataclass(frozen=True)
class FaithfulnessCurve:
    """The result of `faithfulness_curve`.

    ``fractions[i]`` of the valid edges (``n_edges[i]`` edges) give ``faithfulness[i]`` and
    raw ``metrics[i]``. ``cpr`` (area under the curve, higher is better) and ``cmd`` (area
    of ``|1 - faithfulness|``, lower is better) use MIB's trapezoid rule over the fraction of
    edges (module docstring).
    """

    fractions: tuple[float, ...]
    n_edges: tuple[int, ...]
    faithfulness: tuple[float, ...]
    metrics: tuple[float, ...]
    metric_full: float
    metric_empty: float
    cpr: float
    cmd: float
    ablation: str
    n_examples: int
    selection: dict[str, Any] = field(default_factory=dict)


def _normalize(value: float, full: float, empty: float) -> float:
    gap = full - empty
    return float("nan") if gap == 0 else (value - empty) / gap


def _evaluate(
    model: Any,
    data: TaskData,
    circuits: Sequence[Circuit],
    ablation: Ablation,
    reference: TaskData | torch.Tensor | None,
    batch_size: int | None,
) -> tuple[float, list[float]]:
    """Mean metric of the unmasked model and of each circuit, over ``data`` in batches.

    One set of hooks serves all circuits: per batch, one plain forward, (corrupt) one
    reference forward, then one masked forward per circuit with its precomputed plan. Under
    corrupt ablation the empty circuit is the corrupt run itself (every receiver reads the
    corrupt senders plus the same biases), so its metric comes from the reference forward;
    `tests/test_masking.py` checks that identity on the masked forward.
    """
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a ctlens.TaskData, got {type(data).__name__}")
    graph = Graph.from_model(model)
    data.check_vocab(model.cfg.d_vocab)
    device = model_device(model)
    full_total = 0.0
    totals = [0.0] * len(circuits)
    with eval_mode(model), torch.no_grad():
        corrupt, means = resolve_reference(model, graph, data, ablation, reference, batch_size)
        mask = EdgeMask(model, circuits[0], ablation)
        if means is not None:
            mask.set_means(means)
        plans = [mask.plan(c) for c in circuits]
        offset = 0
        with model.hooks(fwd_hooks=mask.hooks()):
            for batch in data.batches(batch_size):
                rows = slice(offset, offset + len(batch))
                offset += len(batch)
                batch = batch.trimmed().to(device)
                with mask.paused():
                    full_logits = model(batch.clean)
                full_total += float(batch.metric_values(full_logits, full_logits).sum())
                ref_logits = None
                if corrupt is not None:
                    tokens = corrupt[rows, : batch.clean.shape[1]].to(device)
                    ref_logits = mask.set_reference(tokens)
                for k, plan in enumerate(plans):
                    if ref_logits is not None and plan.circuit.n_edges == 0:
                        logits = ref_logits  # every edge ablated = the corrupt run itself
                    else:
                        mask.use(plan)
                        logits = model(batch.clean)
                    totals[k] += float(batch.metric_values(logits, full_logits).sum())
    n = len(data)
    return full_total / n, [t / n for t in totals]


def faithfulness(
    model: Any,
    data: TaskData,
    circuit: Circuit,
    ablation: str | Ablation = "corrupt",
    reference: TaskData | torch.Tensor | None = None,
    batch_size: int | None = 32,
) -> FaithfulnessResult:
    """Run ``data`` with every edge outside ``circuit`` ablated exactly; compare to full/empty.

    Args:
        model: a bridge from `ctlens.load_model`.
        data: the task examples and metric.
        circuit: the circuit to keep.
        ablation: ``"corrupt"`` (the paired corrupt prompts, or ``reference`` token ids of
            the same shape as ``data.clean``), ``"mean"`` (means over the clean prompts, or
            over ``reference``: a `TaskData`, token ids or precomputed means) or ``"zero"``.
        reference: see ``ablation`` (the same meaning as in `ctlens.attribute`).
        batch_size: examples per forward pass (``None``: all at once).

    Returns:
        A frozen `FaithfulnessResult`. Runs in eval mode without gradients and restores the
        mode; the model is left unchanged.
    """
    ablation = Ablation.parse(ablation)
    graph = Graph.from_model(model)
    if not isinstance(circuit, Circuit):
        raise TypeError(f"circuit must be a ctlens.Circuit, got {type(circuit).__name__}")
    empty = Circuit.empty(graph)
    full, (m_circuit, m_empty) = _evaluate(
        model, data, [circuit, empty], ablation, reference, batch_size
    )
    value = _normalize(m_circuit, full, m_empty)
    if math.isnan(value):
        warnings.warn(
            "the full model and the empty circuit give the same metric, so faithfulness is "
            "undefined (NaN); use a task or ablation that the metric separates",
            stacklevel=2,
        )
    return FaithfulnessResult(
        faithfulness=value,
        metric_circuit=m_circuit,
        metric_full=full,
        metric_empty=m_empty,
        n_edges=circuit.n_edges,
        n_total_edges=graph.n_edges,
        n_examples=len(data),
        ablation=ablation.value,
    )


def faithfulness_curve(
    model: Any,
    data: TaskData,
    scores: Any,
    sizes: Sequence[float] | None = None,
    ablation: str | Ablation = "corrupt",
    reference: TaskData | torch.Tensor | None = None,
    batch_size: int | None = 32,
    method: str = "top_n",
    prune: bool = False,
) -> FaithfulnessCurve:
    """Faithfulness of the top-|score| circuits over a grid of sizes, with CPR and CMD.

    Args:
        model: a bridge from `ctlens.load_model`.
        data: the task examples and metric.
        scores: `ctlens.EdgeScores` of this model.
        sizes: increasing fractions of the valid edges in (0, 1]; default MIB's grid
            `MIB_FRACTIONS` (0.1 % ... 100 %). Each gives ``max(1, int(f * n_edges))`` edges.
        method: ``"top_n"`` (default) or ``"greedy"`` (see `Circuit.from_scores`).
        prune: prune each circuit (`Circuit.from_scores`).
        ablation: ``"corrupt"``, ``"mean"`` or ``"zero"``, as in `faithfulness`.
        reference: overrides the default reference, as in `faithfulness`.
        batch_size: examples per forward pass (``None``: all at once).

    Returns:
        A frozen `FaithfulnessCurve`.
    """
    ablation = Ablation.parse(ablation)
    graph = Graph.from_model(model)
    if getattr(scores, "graph", None) != graph:
        raise ValueError(
            "scores must be ctlens.EdgeScores computed on this model (their graph differs or "
            "they are not EdgeScores)"
        )
    fractions = tuple(float(f) for f in (MIB_FRACTIONS if sizes is None else sizes))
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"sizes must be fractions of the edges in (0, 1], got {fractions}")
    if any(b <= a for a, b in zip(fractions, fractions[1:], strict=False)):
        raise ValueError(f"sizes must be strictly increasing, got {fractions}")
    if method not in ("top_n", "greedy"):
        raise ValueError(f"method must be 'top_n' or 'greedy', got {method!r}")
    counts = tuple(max(1, int(f * graph.n_edges)) for f in fractions)
    circuits = [Circuit.from_scores(scores, method, top_n=n, prune=prune) for n in counts]
    empty = Circuit.empty(graph)
    full, metrics = _evaluate(model, data, [*circuits, empty], ablation, reference, batch_size)
    m_empty = metrics.pop()
    faith = tuple(_normalize(m, full, m_empty) for m in metrics)
    cpr, cmd = curve_areas(fractions, faith)
    return FaithfulnessCurve(
        fractions=fractions,
        n_edges=tuple(c.n_edges for c in circuits),
        faithfulness=faith,
        metrics=tuple(metrics),
        metric_full=full,
        metric_empty=m_empty,
        cpr=cpr,
        cmd=cmd,
        ablation=ablation.value,
        n_examples=len(data),
        selection={"method": method, "prune": prune},
    )


def curve_areas(fractions: Sequence[float], faith: Sequence[float]) -> tuple[float, float]:
    """MIB's CPR and CMD: trapezoid areas of ``f`` and ``|1 - f|`` over the edge fractions."""
    if len(fractions) != len(faith):
        raise ValueError("fractions and faithfulness values must have the same length")
    cpr = cmd = 0.0
    for i in range(len(fractions) - 1):
        width = fractions[i + 1] - fractions[i]
        cpr += width * (faith[i] + faith[i + 1]) / 2
        cmd += width * (abs(1 - faith[i]) + abs(1 - faith[i + 1])) / 2
    return cpr, cmd


# ============================================================================ gradients


@dataclass(frozen=True)
class ParameterRule:
    """Which entries of one parameter may change under a circuit (True = trainable)."""

    name: str
    parameter: nn.Parameter
    trainable: Bool[torch.Tensor, "..."]

    @property
    def n_trainable(self) -> int:
        return int(self.trainable.sum())


def _orientation(module: nn.Module, where: str) -> int:
    """The axis of ``module.weight`` that indexes outputs (0 for nn.Linear, 1 for Conv1D)."""
    if isinstance(module, nn.Linear):
        return 0
    if type(module).__name__ == "Conv1D":
        return 1
    raise ValueError(
        f"{where} is a {type(module).__name__}; restrict_gradients knows nn.Linear and "
        "transformers' Conv1D weights only"
    )


def _component(parent: Any, name: str, where: str) -> nn.Module | None:
    child = getattr(parent, name, None)
    if child is None:
        return None
    module = getattr(child, "original_component", None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{where}.{name} exposes no original_component; is this a ctlens bridge?")
    return module


def parameter_rules(
    model: Any,
    circuit: Circuit,
    train_embeddings: bool = False,
    train_unembedding: bool = False,
) -> list[ParameterRule]:
    """The per-parameter trainable masks that `restrict_gradients` enforces.

    Covers every parameter of ``model`` that can receive a gradient (each listed once);
    parameters that only alias another one's storage (GPT-2's fused ``c_attn`` weight, whose
    q/k/v views are what receive gradients) are not listed. A tied embedding/unembedding
    weight is trainable when either side is.
    """
    graph = Graph.from_model(model)
    if circuit.graph != graph:
        raise ValueError(
            f"the circuit belongs to another model's graph ({circuit.graph!r}); this model has "
            f"{graph!r}. Use a circuit found on this model."
        )
    cfg = model.cfg
    d_head = int(cfg.d_head)
    spec = graph.spec
    sends = circuit.mask.any(1)
    reads = circuit.mask.any(0)
    masks: dict[int, torch.Tensor] = {}
    params: dict[int, nn.Parameter] = {}

    def register(p: torch.Tensor | None) -> None:
        """Map ``p`` (all entries frozen until `allow` opens some); plain tensors that are
        not parameters (the bridge's constant unembedding bias) are skipped."""
        if isinstance(p, nn.Parameter) and id(p) not in masks:
            masks[id(p)] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            params[id(p)] = p  # type: ignore[assignment]

    def allow(p: torch.Tensor | None, index: tuple[Any, ...] = (...,)) -> None:
        """Make ``p[index]`` trainable."""
        if isinstance(p, nn.Parameter):
            register(p)
            masks[id(p)][index] = True

    def head_rows(index: int) -> slice:
        return slice(index * d_head, (index + 1) * d_head)

    for layer in range(spec.n_layers):
        where = f"blocks[{layer}]"
        block = model.blocks[layer]
        attn = block.attn
        q = _component(attn, "q", f"{where}.attn")
        k = _component(attn, "k", f"{where}.attn")
        v = _component(attn, "v", f"{where}.attn")
        o = _component(attn, "o", f"{where}.attn")
        if q is None or k is None or v is None or o is None:
            raise ValueError(
                f"{where}.attn lacks separate q/k/v/o components; restrict_gradients needs "
                "the bridge's split attention projections"
            )
        for module, kind in ((q, NodeKind.Q), (k, NodeKind.K), (v, NodeKind.V)):
            register(module.weight)
            register(module.bias)
            axis = _orientation(module, f"{where}.attn.{kind.value}")
            columns = graph.receiver_slice(layer, kind)
            for offset, on in enumerate(reads[columns].tolist()):
                if on:
                    rows = head_rows(offset)
                    allow(module.weight, (rows,) if axis == 0 else (slice(None), rows))
                    allow(module.bias, (rows,))
        register(o.weight)
        register(o.bias)
        out_axis = _orientation(o, f"{where}.attn.o")
        heads = sends[graph.sender_slice(layer)].tolist()
        for h, on in enumerate(heads):
            if on:
                rows = head_rows(h)
                allow(o.weight, (slice(None), rows) if out_axis == 0 else (rows,))
        if any(heads):
            allow(o.bias)
        mlp = block.mlp
        inputs = [_component(mlp, n, f"{where}.mlp") for n in ("in", "gate")]
        output = _component(mlp, "out", f"{where}.mlp")
        if inputs[0] is None or output is None:
            raise ValueError(f"{where}.mlp lacks in/out components; cannot map MLP parameters")
        mlp_read = bool(reads[graph.receiver_slice(layer, NodeKind.MLP)].any())
        mlp_send = bool(sends[graph.mlp_sender(layer)])
        for module in inputs:
            if module is None:
                continue
            register(module.weight)
            register(getattr(module, "bias", None))
            if mlp_read:
                allow(module.weight)
                allow(getattr(module, "bias", None))
        register(output.weight)
        register(getattr(output, "bias", None))
        if mlp_send:
            allow(output.weight)
            allow(getattr(output, "bias", None))

    embeds = [_component(model, n, "model") for n in ("embed", "pos_embed")]
    for module in embeds:
        if module is not None:
            register(module.weight)
            if train_embeddings and bool(sends[0]):
                allow(module.weight)
    unembed = _component(model, "unembed", "model")
    if unembed is not None:
        register(unembed.weight)
        register(getattr(unembed, "bias", None))
        if train_unembedding and bool(reads[-1]):
            allow(unembed.weight)
            allow(getattr(unembed, "bias", None))

    named = list(model.named_parameters())
    listed = {id(p) for _, p in named}
    if any(key not in listed for key in masks):
        raise ValueError(
            "restrict_gradients mapped a weight that model.named_parameters() does not list; "
            "the bridge layout is not the one ctlens knows"
        )
    mapped_ranges = [_memory_range(params[key]) for key in params]
    rules: list[ParameterRule] = []
    for name, p in named:
        if id(p) in masks:
            rules.append(ParameterRule(name, p, masks[id(p)]))
        elif _overlaps(_memory_range(p), mapped_ranges):
            continue  # an alias (GPT-2's fused qkv): its mapped views carry the gradients
        else:
            frozen = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            rules.append(ParameterRule(name, p, frozen))
    return rules


def _memory_range(p: torch.Tensor) -> tuple[int, int, int]:
    """``(storage id, first byte, last byte + 1)`` that ``p``'s elements can occupy."""
    if p.numel() == 0:
        return (p.untyped_storage().data_ptr(), 0, 0)
    span = sum((size - 1) * abs(stride) for size, stride in zip(p.shape, p.stride(), strict=True))
    start = p.data_ptr()
    return (p.untyped_storage().data_ptr(), start, start + (span + 1) * p.element_size())


def _overlaps(r: tuple[int, int, int], ranges: list[tuple[int, int, int]]) -> bool:
    return any(r[0] == o[0] and r[1] < o[2] and o[1] < r[2] for o in ranges)


class GradientRestriction:
    """The handle `restrict_gradients` yields: which parameter entries may change.

    `set_circuit` switches to another circuit in place (after rediscovery) without leaving
    the context: gradient masks and ``requires_grad`` flags are updated and the frozen
    entries are re-snapshotted at their current values.
    """

    def __init__(
        self,
        model: Any,
        circuit: Circuit,
        optimizer: torch.optim.Optimizer | None,
        train_embeddings: bool,
        train_unembedding: bool,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.train_embeddings = train_embeddings
        self.train_unembedding = train_unembedding
        self.rules: list[ParameterRule] = []
        self._flags = {id(p): p.requires_grad for p in model.parameters()}
        self._scales: dict[int, torch.Tensor | None] = {}  # None: gradient passes unchanged
        self._saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []
        self.set_circuit(circuit)
        for rule in self.rules:
            p = rule.parameter
            if self._flags[id(p)]:  # hooks need requires_grad while registering
                flag = p.requires_grad
                p.requires_grad_(True)
                self._handles.append(p.register_hook(self._grad_hook(id(p))))
                p.requires_grad_(flag)
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._restore))

    @property
    def n_trainable(self) -> int:
        """Number of parameter entries that may change."""
        return sum(r.n_trainable for r in self.rules)

    @property
    def n_total(self) -> int:
        """Number of real parameter entries (aliases counted once)."""
        return sum(r.parameter.numel() for r in self.rules)

    def trainable(self) -> dict[str, torch.Tensor]:
        """``{parameter name: bool mask}`` of the entries that may change."""
        return {r.name: r.trainable for r in self.rules}

    def set_circuit(self, circuit: Circuit) -> None:
        """Restrict to ``circuit`` from now on (same model graph)."""
        rules = parameter_rules(self.model, circuit, self.train_embeddings, self.train_unembedding)
        if self.rules and [id(r.parameter) for r in rules] != [id(r.parameter) for r in self.rules]:
            raise RuntimeError("the model's parameters changed inside restrict_gradients")
        self.rules = rules
        in_optimizer = set()
        if self.optimizer is not None:
            in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        saved = []
        for rule in rules:
            p, keep = rule.parameter, rule.trainable
            key = id(p)
            everything, nothing = bool(keep.all()), not bool(keep.any())
            self._scales[key] = None if everything or nothing else keep.to(p.dtype)
            p.requires_grad_(self._flags[key] and not nothing)
            if key in in_optimizer and not everything:
                saved.append((p, keep, p.detach().clone()))
        self._saved = saved

    def _grad_hook(self, key: int) -> Any:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            scale = self._scales[key]
            return None if scale is None else grad * scale

        return hook

    def _restore(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p, keep, old in self._saved:
                p.copy_(torch.where(keep, p, old))

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p in self.model.parameters():
            p.requires_grad_(self._flags.get(id(p), p.requires_grad))


@contextlib.contextmanager
def restrict_gradients(
    model: Any,
    circuit: Circuit,
    optimizer: torch.optim.Optimizer | None = None,
    train_embeddings: bool = False,
    train_unembedding: bool = False,
) -> Iterator[GradientRestriction]:
    """Inside: only the parameters of circuit nodes change (slice by slice, module docstring).

    Args:
        model: a bridge from `ctlens.load_model`.
        circuit: a `Circuit` of this model's graph.
        optimizer: if given, frozen entries of its parameters are copied back after every
            ``optimizer.step()`` so they stay bit-identical under momentum and weight decay.
            Without it, only gradients are masked (momentum or weight decay may still move
            frozen entries).
        train_embeddings: let the embeddings move when ``input`` sends along a circuit edge.
        train_unembedding: let the unembedding move when ``logits`` is a circuit receiver.

    Yields:
        A `GradientRestriction` (``rules``, ``n_trainable``, ``trainable()``,
        ``set_circuit(circuit)``).

    What it changes, and restores on exit (also when the body raises): parameters with no
    trainable entry get ``requires_grad=False``; every mapped parameter gets a gradient
    hook that zeroes frozen entries; the optimizer gets a step post-hook. On exit the hooks
    are removed and every ``requires_grad`` flag is restored. Parameter values, gradients
    already stored and optimizer state are not touched on entry or exit.
    """
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    restriction = GradientRestriction(
        model, circuit, optimizer, train_embeddings, train_unembedding
    )
    try:
        yield restriction
    finally:
        restriction._close()


def _check_tokens(tokens: Any, model: Any, name: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.ndim != 2:
        raise TypeError(f"{name} must be token ids [batch, seq] (an integer tensor)")
    vocab = int(model.cfg.d_vocab)
    if ((tokens < 0) | (tokens >= vocab)).any():
        raise ValueError(f"{name} holds token ids outside the vocabulary of {vocab}")
    return tokens.long()


__all__ = [
    "MIB_FRACTIONS",
    "EdgeMask",
    "FaithfulnessCurve",
    "FaithfulnessResult",
    "GradientRestriction",
    "ParameterRule",
    "curve_areas",
    "edge_mask",
    "faithfulness",
    "faithfulness_curve",
    "parameter_rules",
    "restrict_gradients",
]
