"""Fitting attribution into memory: buffer dtype, receiver and sender chunks, batch size.

Per batch, `ctlens.attribute` holds one buffer of sender activation differences
``[n_senders, batch, pos, d_model]`` - its largest allocation (Llama-3.1-8B, 1,057 senders,
at 8 x 128 tokens: 17.7 GB in fp32; `SenderLayout` counts what the store holds, where a
neuron-grouped MLP is kept as its ``d_mlp``-wide hidden activation) - and the fp32 receiver
gradients that wait to be multiplied with it (`ctlens.attribution.EapKernel` queues up to a
quarter of the sender count on large graphs, so the buffer is read a few times per backward,
not once per hook). `fit_attribution` picks, for a budget in bytes, the first of:

1. the fp32 buffer, full queue, at the caller's batch size (exactly an unbudgeted run);
2. **receiver chunks**: the fp32 buffer with fewer receiver columns queued per product
   (down to one hook's columns). Same passes, same fp32 arithmetic per score; only the
   grouping of the matrix products changes, so scores agree to float rounding;
3. for a bf16/fp16 model, the buffer in the model's dtype, with the score products still
   computed in fp32: the buffer's sender rows are upcast ``chunk`` rows at a time, so no
   fp32 copy of the whole buffer is ever made, and receiver gradients are scored per hook;
4. smaller batches (micro-batches) of the same examples. Scores are means over examples,
   so they do not change beyond rounding;
5. **sender chunks**, when not even one example's buffer fits: the senders are split into
   ``ceil(n_senders / senders)`` contiguous groups and each group gets its own reference
   forward, clean forward and backward, filling only its rows of the score matrix. This
   is what lets long contexts fit (the buffer shrinks with the group, to one sender row),
   at the price of one set of passes per group; scores are exactly those of one pass.
   (``eap-ig`` keeps the input sender's row besides, to shift its inputs: one row more.)

Receiver chunking alone cannot rescue an example whose sender buffer is too large, and
sender chunking costs whole passes, so the cheap levers go first. If one example does not
fit even with one sender per pass, the error says how much it needs, before anything is
allocated. Scores stay fp32. The budget bounds these buffers - what attribution adds on top
of one forward and backward pass - not the model's weights or its own activations
(`ctlens.plan` adds those). Without an explicit budget, half of the memory available on
the model's device is used (CUDA: free device memory; CPU: the kernel's ``MemAvailable``);
where that cannot be read, nothing is limited.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*")
"""A memory size: a number (sign, decimals, exponent), optional spaces, an optional unit."""
_CHUNK = 16  # sender rows upcast at a time when micro-batching a low-precision buffer


@dataclass(frozen=True)
class AttributionFit:
    """How `attribute` runs within a memory budget (see the module docstring)."""

    batch_size: int | None  # examples per pass (None: all at once)
    buffer_dtype: torch.dtype  # dtype of the sender-difference buffer
    chunk: int | None  # sender rows upcast to fp32 at a time (None: the buffer is fp32)
    budget: int | None  # bytes (None: unlimited)
    receivers: int | None = None  # receiver columns queued per product (None: the default)
    senders: int | None = None  # sender rows per pass (None: all, one set of passes)

    def changed(self, batch_size: int | None) -> bool:
        """True when this fit differs from an unbudgeted run at ``batch_size``."""
        return (
            self.buffer_dtype != torch.float32
            or self.batch_size != batch_size
            or self.receivers is not None
            or self.senders is not None
        )

    def sender_groups(self, n_senders: int) -> list[range]:
        """The contiguous sender ranges scored by separate passes (one range: all)."""
        size = n_senders if self.senders is None else self.senders
        return [range(s, min(s + size, n_senders)) for s in range(0, n_senders, size)]

    def as_metadata(self) -> dict[str, Any]:
        """A JSON-ready record for `EdgeScores.metadata`."""
        return {
            "budget_bytes": self.budget,
            "batch_size": self.batch_size,
            "buffer_dtype": str(self.buffer_dtype).removeprefix("torch."),
            "chunk": self.chunk,
            "receivers": self.receivers,
            "senders": self.senders,
        }


WORKSPACE_ROWS = 256
"""Group rows `ctlens.eap_kernel.SenderStore` expands per product (at least one layer's)."""


def workspace_rows(held: list[int], floor: int) -> int:
    """Rows of the fp32 workspace `ctlens.eap_kernel.SenderStore` expands group rows into:
    its grouped layers (``held`` group rows each, in order) are expanded in turn until a
    batch holds at least ``floor`` rows (`WORKSPACE_ROWS`, or a layer's groups if more);
    the largest batch (0: no grouped layer)."""
    batch, most = 0, 0
    for rows in held:
        batch += rows
        if batch >= floor:
            most, batch = max(most, batch), 0
    return max(most, batch)


@dataclass(frozen=True)
class SenderLayout:
    """How attribution's sender store (`ctlens.eap_kernel.SenderStore`) holds a graph's
    senders, for counting its bytes: input, heads and one-group MLPs as ``d_model``-wide
    rows; each neuron-grouped MLP layer as its ``d_mlp``-wide hidden activation, its group
    rows expanded into one fp32 workspace of whole layers (`workspace_rows`) when a product
    needs them. The sender order is `ctlens.graph.Graph`'s: ``input``, then
    per layer its heads and its MLP's ``mlp_groups`` nodes."""

    n_layers: int
    n_heads: int
    d_model: int
    mlp_groups: int = 1
    d_mlp: int = 0

    @classmethod
    def of(cls, model: Any, graph: Any) -> SenderLayout:
        """The layout of ``graph`` (a `ctlens.graph.Graph`) on the loaded ``model``."""
        spec = graph.spec
        return cls(spec.n_layers, spec.n_heads, int(model.cfg.d_model), spec.mlp_groups,
                   int(model.cfg.d_mlp))

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + self.mlp_groups)

    def grouped_rows(self) -> list[range]:
        """The sender rows of each neuron-grouped MLP layer (none on a one-group graph)."""
        if self.mlp_groups == 1:
            return []
        step = self.n_heads + self.mlp_groups
        return [range(1 + layer * step + self.n_heads, 1 + (layer + 1) * step)
                for layer in range(self.n_layers)]

    def token_bytes(self, senders: range, itemsize: int) -> int:
        """Bytes per token (one example's position) the store holds for ``senders``, in a
        buffer of ``itemsize`` bytes per element: `held_bytes` and the workspace."""
        return self.held_bytes(senders, itemsize) + self.workspace_bytes(senders)

    def held_bytes(self, senders: range, itemsize: int) -> int:
        """Bytes per token of the plain rows and grouped layers' hidden activations."""
        held = self._grouped_held(senders)
        plain = len(senders) - sum(held)
        return (plain * self.d_model + len(held) * self.d_mlp) * itemsize

    def workspace_bytes(self, senders: range) -> int:
        """Bytes per token of the fp32 workspace the held group rows are expanded into."""
        floor = max(self.mlp_groups, WORKSPACE_ROWS)
        return workspace_rows(self._grouped_held(senders), floor) * self.d_model * 4

    def _grouped_held(self, senders: range) -> list[int]:
        """Group rows of ``senders`` in each grouped layer that holds any, in order."""
        return [n for r in self.grouped_rows()
                if (n := min(r.stop, senders.stop) - max(r.start, senders.start)) > 0]

    def largest_pass(self, senders: int | None, itemsize: int) -> int:
        """`token_bytes` of the largest store when ``senders`` rows are scored per pass
        (`AttributionFit.sender_groups`; None: all at once)."""
        fit = AttributionFit(None, torch.float32, None, None, senders=senders)
        return max(self.token_bytes(g, itemsize) for g in fit.sender_groups(self.n_senders))


def parse_bytes(value: int | float | str, name: str = "max_memory") -> int:
    """A memory size as a number of bytes: ``8_000_000_000``, ``8e9``, ``"8GB"``,
    ``"7.5 GiB"``, ``"512MiB"`` (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; any case).

    The one reader of every memory size a user passes (``max_memory``, ``ctlens plan``'s
    ``budget``; ``name`` says which in the errors): a number must be a whole number of
    bytes, a string a positive number with an optional unit, and the size at least one byte.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{name} must be bytes (a whole number) or a string like '8GB', "
                        f"got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise TypeError(f"{name} must be bytes (a whole number) or a string like '8GB', "
                        f"got {value!r}")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = "" if match is None else match.group(2).lower()
        if match is None or unit not in _UNITS or not math.isfinite(float(match.group(1))):
            raise ValueError(
                f"{name}={value!r}: cannot read the memory budget, it is not a size; write "
                "bytes or a positive number with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, "
                "TiB), e.g. 8GB, 24GiB or 512MiB"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    else:
        size = int(value)
    if size < 1:
        raise ValueError(f"{name}={value!r}: the memory budget must be positive (at least "
                         "one byte)")
    return size


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CUDA: free device memory; CPU: ``MemAvailable``), or None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_queue(rows: int, chunk: int | None) -> int:
    """Receiver columns `ctlens.attribution.EapKernel` queues per product by default: a
    quarter of a large fp32 buffer's rows (at least 16), else 1 (each hook scored at once;
    on small buffers one product per hook avoids the copies batching takes)."""
    return max(16, rows // 4) if chunk is None and rows > 256 else 1


def gradient_bytes(d_model: int, width: int, queue: int) -> int:
    """Bytes per token of the fp32 receiver gradients `ctlens.attribution.EapKernel` holds
    twice (queue and concatenation: up to ``queue - 1`` columns plus one hook's ``width``)."""
    return d_model * 2 * (queue - 1 + width) * 4


def bytes_per_example(
    layout: SenderLayout, senders: int | None, seq: int, width: int, itemsize: int,
    chunk: int | None, queue: int | None = None,
) -> int:
    """Attribution's buffer bytes per example: the sender store of the largest pass of
    ``senders`` rows (None: all; `SenderLayout.largest_pass`) in ``itemsize`` bytes, the
    receiver gradients (`gradient_bytes`) and, for a low-precision buffer, ``chunk`` sender
    rows upcast to fp32. ``queue=None``: the kernel's default (`default_queue`)."""
    rows = layout.n_senders if senders is None else senders
    queue = default_queue(rows, chunk) if queue is None else queue
    store = layout.largest_pass(senders, itemsize) + (chunk or 0) * layout.d_model * 4
    return seq * (store + gradient_bytes(layout.d_model, width, queue))


def fit_buffers(
    layout: SenderLayout,
    seq: int,
    width: int,
    dtype: torch.dtype,
    n_examples: int,
    batch_size: int | None,
    budget: int | None,
) -> AttributionFit:
    """`fit_attribution` from shapes alone (also what `ctlens.plan` predicts with).

    ``layout`` is the graph's sender store; ``width`` the widest receiver hook (heads, or
    MLP neuron groups if more); ``dtype`` the model's. The regimes are tried in the module
    docstring's order.
    """
    want = n_examples if batch_size is None else min(batch_size, n_examples)
    n_senders, d_model = layout.n_senders, layout.d_model

    def need(rows: int, itemsize: int, chunk: int | None, queue: int | None = None) -> int:
        return bytes_per_example(layout, rows, seq, width, itemsize, chunk, queue)

    full = default_queue(n_senders, None)
    if budget is None or want * need(n_senders, 4, None) <= budget:
        return AttributionFit(batch_size, torch.float32, None, budget)
    per_column = seq * d_model * 2 * 4  # one more queued receiver column, twice, fp32
    base = need(n_senders, 4, None, 1)
    if full > 1 and want * base <= budget:  # receiver chunks
        queue = min(full - 1, 1 + (budget // want - base) // per_column)
        return AttributionFit(batch_size, torch.float32, None, budget, receivers=int(queue))
    low = dtype.is_floating_point and dtype.itemsize < 4
    item = dtype.itemsize if low else 4
    buffer_dtype = dtype if low else torch.float32
    if low:  # a low-precision buffer, upcast ``chunk`` rows at a time
        row = want * seq * d_model * 4
        chunk = min(n_senders // 2, (budget - want * need(n_senders, item, 1) + row) // row)
        if chunk >= 1:
            return AttributionFit(batch_size, dtype, int(chunk), budget)

    def chunk_of(rows: int) -> int | None:
        return min(rows, _CHUNK) if low else None

    micro = budget // need(n_senders, item, chunk_of(n_senders), 1)
    if micro >= 1:  # micro-batches; an fp32 buffer queues what the rest of the budget holds
        queue = 1 if low else min(full, 1 + (budget // micro - base) // per_column)
        receivers = None if queue == default_queue(n_senders, chunk_of(n_senders)) else queue
        return AttributionFit(int(micro), buffer_dtype, chunk_of(n_senders), budget, receivers)
    return _sender_chunks(n_senders, want, budget, item, buffer_dtype, chunk_of, need)


def _sender_chunks(
    n_senders: int, want: int, budget: int, item: int, buffer_dtype: torch.dtype,
    chunk_of: Any, need: Any,
) -> AttributionFit:
    """Regime 5: the fewest sender groups whose buffer holds one example, or an error."""

    def one(rows: int) -> int:
        return need(rows, item, chunk_of(rows), 1)

    if one(1) > budget:
        raise ValueError(
            f"attribution needs about {one(1) / 1e9:.3g} GB per example here even with one "
            f"sender per pass (and {one(n_senders) / 1e9:.3g} GB with all {n_senders}), more "
            f"than max_memory={budget / 1e9:.3g} GB; raise max_memory, shorten the prompts, "
            "or attribute a smaller model"
        )
    lo, hi = 1, n_senders  # one(lo) fits, one(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if one(mid) <= budget else (lo, mid)
    rows = math.ceil(n_senders / math.ceil(n_senders / lo))  # balanced groups ...
    if one(rows) > budget:  # ... unless they cut grouped layers worse (group rows cost more)
        rows = lo
    batch = min(want, budget // one(rows))
    receivers = None if default_queue(rows, chunk_of(rows)) == 1 else 1
    return AttributionFit(int(batch), buffer_dtype, chunk_of(rows), budget, receivers, rows)


def fit_attribution(
    model: Any,
    graph: Any,
    seq: int,
    n_examples: int,
    batch_size: int | None,
    max_memory: int | str | None,
) -> AttributionFit:
    """Choose buffer dtype, chunks and batch size for ``graph`` on ``model`` (module docstring)."""
    if max_memory is None:
        free = available_memory(next(model.parameters()).device)
        budget = None if free is None else free // 2
    else:
        budget = parse_bytes(max_memory)
    layout = SenderLayout.of(model, graph)
    width = max(layout.n_heads, layout.mlp_groups)
    dtype = next(model.parameters()).dtype
    return fit_buffers(layout, seq, width, dtype, n_examples, batch_size, budget)


__all__ = [
    "WORKSPACE_ROWS", "AttributionFit", "SenderLayout", "available_memory", "bytes_per_example",
    "default_queue", "fit_attribution", "fit_buffers", "gradient_bytes", "parse_bytes",
    "workspace_rows",
]
