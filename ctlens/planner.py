"""Memory planner: predict the peak memory of attribution, forward masking and tuning.

`plan` works from a model's *shape* only: a loaded bridge, an HF module, an HF config or
the name of a real model (`ctlens.real_shapes`), which it builds on the meta device (no
weights, no memory). It adds up what the ctlens code keeps alive at its peak:

- **weights** (the model's dtype), and for tuning the **gradients** and the two **AdamW
  moments** of the trainable block matrices, plus what `restrict_gradients` keeps to make
  frozen slices exact (a copy of each partly-trainable attention matrix, its bool mask and
  its gradient scale). Embeddings, unembedding and norms are frozen, as by default.
- the **sender buffer** ``[n_senders, batch, pos, d_model]`` in fp32 that EAP, EAP-IG and
  batch discovery fill (a neuron-grouped MLP held as its hidden activation and expanded
  into a workspace: `ctlens.memory.SenderLayout`), the fp32 **receiver gradients** queued
  to be multiplied with it, the fp32 **score** matrix and the mean activations. For
  attribution with a budget, the buffers are fitted exactly as `ctlens.attribute` fits
  them (`ctlens.memory.fit_buffers`, given what the budget leaves after weights,
  activations and logits): fewer queued receiver columns, a bf16/fp16 buffer, smaller
  batches or sender chunks, and the plan reports that fit and the ``max_memory`` that
  reproduces it;
- the **activations** autograd keeps for the backward. ctlens asks the bridge for per-head
  q/k/v inputs and per-head outputs (``[batch, pos, heads, d_model]`` tensors, normalised
  per head), and residual-width copies dominate; they are modelled per layer and token
  as ``c_qkv (H + 2 H_kv) d + c_res d + c_mlp F + c_att H T`` elements of the model
  dtype (F: the MLP's hidden units, doubled with a gate; T: the sequence length), with
  coefficients per operation fitted to CPU measurements (`benchmarks/plan.py --fit`) and
  checked on other shapes by the same script;
- the **logits** the loss or metric reads (only the metric positions for attribution).

Under FSDP (``shard="fsdp"``, as in `ctlens.TuneConfig`) with ``ranks`` processes,
weights, gradients and optimizer state are divided by the number of ranks and two layers'
worth of full weights are added (the all-gathered layer and the prefetched next one);
activations follow the per-rank rows of the global batch. Without sharding, ``ranks`` is
data parallelism: only the batch is divided.

What is planned is an *operation* (``"attribute"``, ``"forward"``, ``"tune"``); ``ctlens
plan`` calls it ``--mode``, and `plan` still takes ``mode=``, but it is not a
`TuneConfig` mode (``"tune"`` plans one step in ``mode="gradient"``).

The predictions are for one device; CUDA's caching allocator and fragmentation add a few
percent on a GPU, so leave headroom (``safety``, default 10 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ctlens.data import check_length
from ctlens.file_limits import check_graph_size, graph_shape
from ctlens.graph_spec import GraphSpec, check_mlp_groups
from ctlens.memory import (
    AttributionFit,
    SenderLayout,
    default_queue,
    fit_buffers,
    gradient_bytes,
    parse_bytes,
)
from ctlens.tuning.distributed import check_rows_per_rank
from ctlens.types import Shard, check_positive_int, parse_choice

Operation = Literal["attribute", "forward", "tune"]
OPERATIONS: tuple[str, ...] = ("attribute", "forward", "tune")
METHODS: tuple[str, ...] = ("eap", "eap-ig")
GIB = 1024**3
MAX_PEAK_BYTES = 2**60
"""A plan past this (an exbibyte) is refused as beyond any device, not printed."""
MAX_TOKENS = 2**40
"""Tokens per pass (``batch_size * seq_len``) past which a plan is refused outright."""
MAX_SIZE = 2**24
"""The largest layer count, width or vocabulary read from a config (real models' are under
2^20; beyond 2^24 a weight matrix's size overflows torch's byte count)."""

# Activation elements kept per layer and token, by operation (see the module docstring):
# (c_qkv, c_res, c_mlp, c_att) for (H + 2 H_kv) d, d, the MLP width and H T. Fitted with
# ``python benchmarks/plan.py --fit`` on fp32 CPU runs of small random GPT-2, Llama and
# GPT-NeoX shapes; checked on other shapes by the same script (docs/benchmarks.md).
_ACTIVATION: dict[str, tuple[float, float, float, float]] = {
    "eap": (1.91, 18.44, 4.29, 0.0),
    "eap-ig": (2.18, 21.01, 4.89, 0.0),
    "forward": (3.1, 16.65, 5.85, 0.0),
    "tune": (4.02, 0.0, 8.61, 2.83),
}


class MemoryBudgetError(ValueError):
    """The budget is below what the model needs at the smallest batch; says how much."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner reads from a model: sizes, parameter groups and dtype."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    gated_mlp: bool
    vocab: int
    n_params: int  # distinct parameters (tied weights once)
    attn_params: int  # attention matrices and biases of every block
    mlp_params: int  # MLP matrices and biases of every block
    largest_layer_params: int  # the largest block (what FSDP all-gathers at once)
    dtype: torch.dtype = torch.float32
    n_ctx: int | None = None  # positions the model reads (None: unknown)

    @property
    def mlp_width(self) -> int:
        """Hidden units the MLP computes per token (twice ``d_mlp`` with a gate)."""
        return self.d_mlp * (2 if self.gated_mlp else 1)

    @property
    def bytes_per_param(self) -> int:
        return torch.empty((), dtype=self.dtype, device="meta").element_size()

    def graph_size(self, mlp_groups: int = 1) -> tuple[int, int]:
        """``(n_senders, n_receivers)`` of ctlens's graph for this shape."""
        return graph_shape(self.graph_spec(mlp_groups))

    def graph_spec(self, mlp_groups: int = 1) -> GraphSpec:
        """The spec of ctlens's graph for this shape (checked as `GraphSpec` checks)."""
        return GraphSpec(self.n_layers, self.n_heads, self.n_kv_heads, mlp_groups=mlp_groups)

    def sender_layout(self, mlp_groups: int = 1) -> SenderLayout:
        """How attribution's sender store holds this shape's graph (for its bytes)."""
        return SenderLayout(self.n_layers, self.n_heads, self.d_model, mlp_groups, self.d_mlp)


@dataclass
class Plan:
    """A prediction: the peak in bytes, its parts, and (with a budget) the advice."""

    shape: ModelShape
    operation: str
    method: str | None
    batch_size: int
    seq_len: int
    ranks: int
    shard: Shard | None
    parts: dict[str, int]
    budget_bytes: int | None = None
    recommended_batch: int | None = None
    notes: list[str] = field(default_factory=list)
    attribution: AttributionFit | None = None  # attribute: how its buffers are fitted
    max_memory: int | None = None  # attribute with a budget: the max_memory to pass

    @property
    def peak_bytes(self) -> int:
        """Predicted peak memory of one device (bytes)."""
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits the budget (``None`` without a budget)."""
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``ctlens plan --json``)."""
        return {
            "model": self.shape.name, "mode": self.operation, "method": self.method,
            "batch_size": self.batch_size, "seq_len": self.seq_len, "ranks": self.ranks,
            "shard": self.shard is not None, "dtype": str(self.shape.dtype).removeprefix("torch."),
            "peak_bytes": self.peak_bytes, "parts": dict(self.parts),
            "budget_bytes": self.budget_bytes, "fits": self.fits,
            "recommended_batch": self.recommended_batch, "notes": list(self.notes),
            "attribution": None if self.attribution is None else self.attribution.as_metadata(),
            "max_memory": self.max_memory,
        }

    def table(self) -> str:
        """Human-readable breakdown (what ``ctlens plan`` prints)."""
        what = self.operation if self.method is None else f"{self.operation} ({self.method})"
        sharded = self.shard is not None
        par = f", {self.ranks} ranks{' FSDP' if sharded else ' data-parallel'}"
        lines = [
            f"{self.shape.name}: {what}, batch {self.batch_size} x {self.seq_len} tokens, "
            f"{str(self.shape.dtype).removeprefix('torch.')}"
            f"{par if self.ranks > 1 else ''}",
        ]
        width = max(len(k) for k in self.parts)
        for key, value in self.parts.items():
            lines.append(f"  {key:<{width}}  {value / GIB:9.3f} GiB")
        lines.append(f"  {'peak':<{width}}  {self.peak_bytes / GIB:9.3f} GiB per device")
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits else "does not fit"
            lines.append(f"budget {self.budget_bytes / GIB:.2f} GiB: {verdict}; "
                         f"largest batch that fits: {self.recommended_batch}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def plan(
    model: Any,
    batch_size: int = 8,
    seq_len: int = 128,
    operation: Operation | None = None,
    method: str = "eap",
    mlp_groups: int = 1,
    dtype: torch.dtype | str | None = None,
    ranks: int = 1,
    shard: Shard | str | bool | None = None,
    budget: float | int | str | None = None,
    safety: float = 0.1,
    vocab_positions: int = 1,
    *,
    spans: int = 1,
    mode: Operation | None = None,
) -> Plan:
    """Predict the peak memory of one ctlens operation without allocating anything.

    Args:
        model: a bridge from `ctlens.load_model`, an HF module, an HF config, or a name
            from `ctlens.real_shapes` (e.g. ``"llama-3.1-8b"``).
        batch_size: rows per forward pass (the global batch when ``ranks > 1``).
        seq_len: tokens per row.
        operation: ``"attribute"`` (`ctlens.attribute`; the default), ``"forward"`` (a
            training forward and backward under `ctlens.edge_mask`) or ``"tune"`` (one
            `CircuitTuner` step in gradient mode with batch discovery and AdamW).
        method: ``"eap"`` or ``"eap-ig"`` (attribution only).
        mlp_groups: MLP neuron groups per layer in the graph (1: one node per MLP).
        dtype: the weights' dtype (default: the model's, float32 for a config or name).
        ranks: number of processes; ``shard="fsdp"`` (`TuneConfig`'s word; ``True`` also
            reads as it) selects FSDP, ``None`` data parallelism.
        budget: memory per device, bytes or a string like ``"80GB"`` / ``"24GiB"``; the plan
            then recommends the largest batch size that fits.
        safety: fraction of the budget kept free for allocator overhead.
        vocab_positions: metric positions per row (attribution logits).
        spans: token spans of a positional graph (one score matrix each; 1: position-free).
        mode: ``operation`` under the name ``ctlens plan --mode`` gives it (give one).

    Raises:
        MemoryBudgetError: the budget is below the peak at batch size 1.
    """
    if mode is not None and operation is not None and mode != operation:
        raise ValueError(f"operation={operation!r} and mode={mode!r} name the same thing; "
                         "give one")
    name = "operation" if mode is None else "mode"
    operation = mode or operation or "attribute"
    if operation not in OPERATIONS:
        raise ValueError(f"{name} must be one of {', '.join(OPERATIONS)}; got {operation!r}")
    shard = _shard(shard)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("ranks", ranks),
                        ("mlp_groups", mlp_groups), ("vocab_positions", vocab_positions),
                        ("spans", spans)):
        check_positive_int(name, value)
    if not 0 <= safety < 1:
        raise ValueError(f"safety must be in [0, 1), got {safety!r}")
    shape = model_shape(model, dtype)
    check_inputs(shape, batch_size, seq_len, mlp_groups, ranks)
    budget_bytes = None if budget is None else parse_bytes(budget, "budget")

    def at(batch: int, fit: AttributionFit | None = None) -> Plan:
        parts = _parts(shape, operation, method, batch, seq_len, mlp_groups, ranks,
                       shard is not None, vocab_positions, fit, spans)
        return Plan(shape, operation, method if operation == "attribute" else None, batch,
                    seq_len, ranks, shard, parts, attribution=fit)

    result = at(batch_size)
    if result.peak_bytes > MAX_PEAK_BYTES:
        raise ValueError(
            f"{shape.name} would need about 2^{result.peak_bytes.bit_length() - 1} bytes for "
            f"{operation} at batch {batch_size} x {seq_len} tokens, beyond any device (the plan "
            f"stops at 2^{MAX_PEAK_BYTES.bit_length() - 1}); lower --batch-size or --seq-len"
        )
    buffer = result.parts.get("sender buffer", 0)
    if budget_bytes is None and buffer > 0.25 * result.peak_bytes:
        result.notes.append(
            f"the fp32 sender buffer is {buffer / result.peak_bytes:.0%} of the peak; "
            "with a budget, attribution chunks it (ctlens.memory): plan it with --budget"
        )
    if budget_bytes is not None:
        usable = int(budget_bytes * (1 - safety))
        if operation == "attribute":
            return _fit_attribution(at, shape, batch_size, seq_len, mlp_groups, budget_bytes,
                                    usable, safety)
        smallest = at(ranks)
        if smallest.peak_bytes > usable:
            raise MemoryBudgetError(
                f"{shape.name} needs {smallest.peak_bytes / GIB:.2f} GiB per device for "
                f"{operation} at the smallest batch ({ranks} row(s) of {seq_len} tokens), more "
                f"than the {usable / GIB:.2f} GiB usable of the {budget_bytes / GIB:.2f} GiB "
                f"budget ({safety:.0%} kept free); "
                "use a larger device, more ranks with shard='fsdp' (--shard fsdp), a shorter "
                "sequence or a smaller dtype"
            )
        result.budget_bytes = budget_bytes
        result.recommended_batch = _largest_batch(lambda b: at(b).peak_bytes <= usable, ranks)
        result.notes.append(f"budget keeps {safety:.0%} headroom for allocator overhead")
    return result


def check_inputs(
    shape: ModelShape, batch_size: int, seq_len: int, mlp_groups: int, ranks: int
) -> None:
    """Refuse what the planned operation refuses, with the checks it makes: MLP groups
    that do not divide the MLP width (`Graph.from_model`), a graph past the bound on files
    (`ctlens.file_limits`), rows longer than the model's context (attribution,
    faithfulness, tuning) and fewer rows than ranks (`CircuitTuner`)."""
    check_mlp_groups(mlp_groups, shape.d_mlp)
    check_graph_size(shape.graph_spec(mlp_groups), shape.name, "",
                     "split the MLPs into fewer neuron groups")
    check_length(seq_len, shape.n_ctx, "seq_len (--seq-len): a row",
                 f"plan at most {shape.n_ctx} tokens per row")
    check_rows_per_rank(batch_size, ranks)
    if batch_size * seq_len > MAX_TOKENS:
        raise ValueError(
            f"batch_size x seq_len is more than {MAX_TOKENS:,} tokens per pass, beyond any "
            "device; lower batch_size (--batch-size) or seq_len (--seq-len)"
        )


def _shard(value: Shard | str | bool | None) -> Shard | None:
    """``shard`` in `TuneConfig`'s words: ``"fsdp"`` (or ``True``, FSDP being the only
    sharding) or None (``False``)."""
    if value is None or value is False:
        return None
    return Shard.FSDP if value is True else parse_choice(Shard, value, "shard")


def _fit_attribution(
    at: Any, shape: ModelShape, batch_size: int, seq_len: int, mlp_groups: int,
    budget_bytes: int, usable: int, safety: float,
) -> Plan:
    """An attribution plan within a budget, fitted as `ctlens.attribute` fits its buffers.

    Attribution's ``max_memory`` covers its buffers only, and the batch it runs at sets the
    model's activations too, so the plan takes the largest batch ``r <= batch_size`` whose
    weights, activations and logits leave a ``max_memory`` with which `ctlens.attribute`
    runs batches of at most ``r``, choosing the ``r`` whose batches are largest; the parts
    are those of the batch that then runs.
    """
    n_send, _ = shape.graph_size(mlp_groups)
    width = max(shape.n_heads, mlp_groups)

    def room(batch: int) -> int:  # what the budget leaves attribution's buffers at ``batch``
        parts = at(batch).parts
        return usable - sum(v for k, v in parts.items() if k not in _BUFFERS)

    def fit(batch: int, want: int) -> AttributionFit | None:
        """The fit for ``want`` examples per call with the room left at ``batch``, if it
        runs batches of at most ``batch``."""
        if room(batch) < 1:
            return None
        try:
            chosen = fit_buffers(shape.sender_layout(mlp_groups), seq_len, width, shape.dtype,
                                 want, want, room(batch))
        except ValueError:
            return None
        return chosen if (chosen.batch_size or want) <= batch else None

    fits = [(r, f) for r in range(batch_size, 0, -1) if (f := fit(r, batch_size))]
    if not fits:
        raise MemoryBudgetError(
            f"{shape.name} cannot attribute in {budget_bytes / GIB:.2f} GiB ({safety:.0%} kept "
            f"free): at one row of {seq_len} tokens, weights, activations and logits leave "
            f"{room(1) / GIB:.2f} GiB, less than one example's sender buffer even with one "
            "sender per pass; use a larger device, a shorter sequence or a smaller dtype"
        )
    # the largest batch that runs; for equal batches the most room (the cheapest regime)
    r, chosen = max(fits, key=lambda rf: (rf[1].batch_size or batch_size, -rf[0]))
    result = at(chosen.batch_size or batch_size, chosen)
    result.batch_size = batch_size
    result.budget_bytes = budget_bytes
    result.max_memory = room(r)
    result.recommended_batch = _largest_batch(
        lambda b: (f := fit(b, b)) is not None and f.batch_size == b, 1
    )
    result.notes += [
        f"attribute(..., batch_size={batch_size}, max_memory={room(r)}) runs "
        f"{_describe(chosen, batch_size, n_send)}",
        f"budget keeps {safety:.0%} headroom for allocator overhead",
    ]
    return result


_BUFFERS = ("sender buffer", "receiver gradients")


def _describe(fit: AttributionFit, batch_size: int, n_senders: int) -> str:
    """How a fit runs, in words (for the plan's notes)."""
    what = [f"a {str(fit.buffer_dtype).removeprefix('torch.')} sender buffer"]
    if fit.chunk is not None:
        what.append(f"upcast {fit.chunk} rows at a time")
    if fit.receivers is not None:
        what.append(f"{fit.receivers} receiver column(s) per product")
    if fit.batch_size not in (None, batch_size):
        what.append(f"batches of {fit.batch_size}")
    if fit.senders is not None:
        groups = len(fit.sender_groups(n_senders))
        what.append(f"senders in {groups} groups of up to {fit.senders} ({groups} sets of "
                    "passes per batch)")
    return ", ".join(what)


def _largest_batch(fits: Any, step: int) -> int:
    """The largest multiple of ``step`` that ``fits`` (which holds below any batch it holds for)."""
    lo, hi = step, step
    while fits(hi * 2) and hi < 2**20:
        lo, hi = hi * 2, hi * 2
    hi *= 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _parts(
    s: ModelShape, operation: str, method: str, batch: int, seq: int, mlp_groups: int,
    ranks: int, shard: bool, positions: int, fit: AttributionFit | None = None,
    spans: int = 1,
) -> dict[str, int]:
    """The named parts of the peak (bytes) for one device (attribution's buffers as
    ``fit`` chooses them; default: unbudgeted; ``spans`` score matrices)."""
    wb = s.bytes_per_param
    rows = -(-batch // ranks)  # integers throughout: a huge batch must not overflow a float
    n = rows * seq  # tokens per forward on this device
    n_send, n_recv = s.graph_size(mlp_groups)
    divide = ranks if shard else 1
    parts: dict[str, int] = {"weights": s.n_params * wb // divide}
    if shard and ranks > 1:
        parts["fsdp all-gathered layers"] = 2 * s.largest_layer_params * wb
    c_qkv, c_res, c_mlp, c_att = _ACTIVATION[method if operation == "attribute" else operation]
    H, K, d = s.n_heads, s.n_kv_heads, s.d_model
    per_token = c_qkv * (H + 2 * K) * d + c_res * d + c_mlp * s.mlp_width + c_att * H * seq
    parts["activations"] = int(n * s.n_layers * per_token * wb)
    scores = n_send * n_recv * spans * 4
    if operation == "attribute":
        fit = fit or AttributionFit(None, torch.float32, None, None)
        buffer_rows = n_send if fit.senders is None else fit.senders
        item = torch.empty((), dtype=fit.buffer_dtype, device="meta").element_size()
        store = s.sender_layout(mlp_groups).largest_pass(fit.senders, item)
        parts["sender buffer"] = n * (store + d * 4 * (fit.chunk or 0))
        parts["scores"] = scores
        # the fp32 receiver gradients queued (and concatenated) for one product
        queue = fit.receivers or default_queue(buffer_rows, fit.chunk)
        parts["receiver gradients"] = n * gradient_bytes(d, max(H, mlp_groups), queue)
        # the metric's logits
        parts["backward transients"] = 3 * rows * positions * s.vocab * 4
        if method == "eap-ig":
            parts["backward transients"] += n * d * 4
        return parts
    trainable = s.attn_params + s.mlp_params
    parts["gradients"] = (trainable if operation == "tune" else s.n_params) * wb // divide
    parts["logits"] = n * s.vocab * (wb + 8)
    if operation == "forward":
        parts["mean activations"] = n_send * seq * d * 4
        return parts
    parts["optimizer state"] = 2 * trainable * wb // divide
    parts["restriction state"] = s.attn_params * (2 * wb + 1) // divide
    # batch discovery: recorded sender outputs and their deviation from the mean (the
    # store's rows, twice), the means (the same rows at each position), the workspace, scores
    layout, senders = s.sender_layout(mlp_groups), range(n_send)
    held = layout.held_bytes(senders, 4)
    parts["sender buffer"] = (2 * n + seq) * held + n * layout.workspace_bytes(senders)
    parts["scores"] = 2 * scores
    return parts


# ------------------------------------------------------------------------------ shapes


def model_shape(model: Any, dtype: torch.dtype | str | None = None) -> ModelShape:
    """The `ModelShape` of a bridge, HF module, HF config or `ctlens.real_shapes` name."""
    from transformers import PretrainedConfig

    from ctlens import real_shapes

    name = "model"
    if isinstance(model, str):
        spec = real_shapes.shape(model)
        name, module = spec.name, real_shapes.build(spec)
    elif isinstance(model, PretrainedConfig):
        from transformers import AutoModelForCausalLM

        name = _name(model)
        sizes = config_sizes(model, name)  # before building anything from the config
        check_graph_size(GraphSpec(sizes["n_layers"], sizes["n_heads"], sizes["n_kv_heads"]),
                         f"the config of {name}", "", "a real model's graph is far smaller: "
                         "the config is damaged")
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(model)
    elif isinstance(model, torch.nn.Module) and hasattr(model, "original_model"):
        # a bridge: its parameters include views of fused weights, so plan from a meta
        # copy of the wrapped HF module's config (same shapes, counted once)
        name = getattr(model.cfg, "model_name", None) or _name(model.original_model.config)
        with torch.device("meta"):
            module = type(model.original_model)(model.original_model.config)
        return _shape_of(module, str(name), _dtype(dtype, model.original_model))
    elif isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return _shape_of(model, _name(model.config), _dtype(dtype, model))
    else:
        raise TypeError(
            "plan takes a loaded model, an HF module, an HF config or a real-shape name "
            f"({', '.join(real_shapes.names())}); got {type(model).__name__}"
        )
    return _shape_of(module, str(name), _dtype(dtype, module))


def _name(config: Any) -> str:
    return str(getattr(config, "_name_or_path", "") or config.model_type)


def _dtype(dtype: torch.dtype | str | None, module: torch.nn.Module) -> torch.dtype:
    """``dtype`` as `ctlens.load_model` reads it (the same refusals), else the module's."""
    from ctlens.model import parse_dtype

    chosen = parse_dtype(dtype)
    if chosen is None:
        first = next(module.parameters(), None)
        return first.dtype if first is not None else torch.float32
    return chosen


_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer"),
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads",),
    "d_mlp": ("intermediate_size", "n_inner"),
    "vocab": ("vocab_size",),
    "n_ctx": ("n_positions", "max_position_embeddings", "n_ctx"),
}
"""Where an HF config keeps each size the planner reads (first key present wins)."""


def config_sizes(cfg: Any, name: str) -> dict[str, int]:
    """The sizes of an HF config (`_CONFIG_KEYS`), each a positive integer up to `MAX_SIZE`,
    or a ValueError naming the key: a damaged config (``num_hidden_layers = -3``) is refused
    before anything is built from it. ``n_ctx`` is absent when the config does not say."""
    sizes: dict[str, int] = {}
    for size, keys in _CONFIG_KEYS.items():
        key = next((k for k in keys if getattr(cfg, k, None) is not None), None)
        if key is None:
            if size in ("n_kv_heads", "d_mlp", "n_ctx"):
                continue  # defaults below; an unknown context is not checked
            raise ValueError(f"the config of {name} has none of {keys}; cannot plan its memory")
        value = getattr(cfg, key)
        bound = value if size == "n_ctx" else MAX_SIZE  # a context is only compared to rows
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise ValueError(f"the config of {name} says {key} = {value!r}; a model needs a "
                             f"positive integer up to {MAX_SIZE:,} there: the config is damaged")
        sizes[size] = value
    sizes.setdefault("n_kv_heads", sizes["n_heads"])
    sizes.setdefault("d_mlp", 4 * sizes["d_model"])
    return sizes


def _shape_of(module: torch.nn.Module, name: str, dtype: torch.dtype) -> ModelShape:
    sizes = config_sizes(module.config, name)
    seen: set[int] = set()
    attn = mlp = total = 0
    layers: dict[str, int] = {}
    gated = False
    for pname, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        parts = pname.split(".")
        gated = gated or "gate_proj" in parts
        block = next((".".join(parts[: i + 2]) for i, part in enumerate(parts[:-1])
                      if part in ("h", "layers") and parts[i + 1].isdigit()), None)
        if block is None:
            continue
        layers[block] = layers.get(block, 0) + p.numel()
        if p.ndim < 2 and "bias" not in parts[-1]:
            continue  # norm weights stay frozen
        if any(k in parts for k in ("attn", "attention", "self_attn")):
            attn += p.numel()
        elif "mlp" in parts:
            mlp += p.numel()
    return ModelShape(
        name=name,
        n_layers=sizes["n_layers"],
        d_model=sizes["d_model"],
        n_heads=sizes["n_heads"],
        n_kv_heads=sizes["n_kv_heads"],
        d_mlp=sizes["d_mlp"],
        gated_mlp=gated,
        vocab=sizes["vocab"],
        n_params=total,
        attn_params=attn,
        mlp_params=mlp,
        largest_layer_params=max(layers.values(), default=0),
        dtype=dtype,
        n_ctx=sizes.get("n_ctx"),
    )
