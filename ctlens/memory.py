"""Fitting attribution into memory: which buffer dtype and batch size a byte budget allows.

Per batch, `ctlens.attribute` holds one buffer of sender activation differences
``[n_senders, batch, pos, d_model]`` - its largest allocation (Llama-3.1-8B, 1,057 senders,
at 8 x 128 tokens: 17.7 GB in fp32) - and the fp32 receiver gradients that wait to be
multiplied with it (`ctlens.attribution.EapKernel` queues them, about a quarter of the
sender count, so the buffer is read a few times per backward). `fit_attribution` picks,
for a budget in bytes:

1. an fp32 buffer at the caller's batch size, whenever it fits (the numbers are then
   exactly those of an unbudgeted run);
2. else, for a bf16/fp16 model, the buffer in the model's dtype, with the score products
   still computed in fp32: the buffer's sender rows are upcast ``chunk`` rows at a time,
   so no fp32 copy of the whole buffer is ever made, and receiver gradients are scored as
   they arrive instead of queued;
3. else smaller batches (micro-batches) of the same examples. Scores are means over
   examples, so they do not change beyond rounding.

If a single example does not fit, the error says how much it needs. Scores stay fp32.
The budget bounds these buffers - what attribution adds on top of one forward and backward
pass - not the model's weights or its own activations. Without an explicit budget, half of
the memory available on the model's device is used (CUDA: free device memory; CPU: the
kernel's ``MemAvailable``); where that cannot be read, nothing is limited.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_CHUNK = 16  # sender rows upcast at a time when micro-batching a low-precision buffer


@dataclass(frozen=True)
class AttributionFit:
    """How `attribute` runs within a memory budget (see the module docstring)."""

    batch_size: int | None  # examples per pass (None: all at once)
    buffer_dtype: torch.dtype  # dtype of the sender-difference buffer
    chunk: int | None  # sender rows upcast to fp32 at a time (None: the buffer is fp32)
    budget: int | None  # bytes (None: unlimited)

    def changed(self, batch_size: int | None) -> bool:
        """True when this fit differs from an unbudgeted run at ``batch_size``."""
        return self.buffer_dtype != torch.float32 or self.batch_size != batch_size

    def as_metadata(self) -> dict[str, Any]:
        """A JSON-ready record for `EdgeScores.metadata`."""
        return {
            "budget_bytes": self.budget,
            "batch_size": self.batch_size,
            "buffer_dtype": str(self.buffer_dtype).removeprefix("torch."),
            "chunk": self.chunk,
        }


def parse_bytes(value: int | str) -> int:
    """``8_000_000_000``, ``"8GB"``, ``"7.5 GiB"`` or ``"512MiB"`` as a number of bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"max_memory must be bytes (an int) or a string like '8GB', got {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"max_memory={value!r} is not a size: use bytes or a number with a unit "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '8GB'"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
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


def bytes_per_example(
    n_senders: int, seq: int, d_model: int, n_heads: int, itemsize: int, chunk: int | None
) -> int:
    """Attribution's buffer bytes per example: the sender buffer, the fp32 receiver
    gradients `ctlens.attribution.EapKernel` holds twice (queue and concatenation) and, for
    a low-precision buffer, ``chunk`` sender rows upcast to fp32. ``chunk=None`` (an fp32
    buffer): gradients are queued, up to a quarter of the sender count (at least 16) plus
    one layer's heads; with a ``chunk`` each hook is scored at once, one layer's heads."""
    queued = max(16, n_senders // 4) + n_heads if chunk is None else n_heads
    return seq * d_model * (n_senders * itemsize + 2 * queued * 4 + (chunk or 0) * 4)


def fit_attribution(
    model: Any,
    n_senders: int,
    seq: int,
    n_examples: int,
    batch_size: int | None,
    max_memory: int | str | None,
) -> AttributionFit:
    """Choose the buffer dtype, sender chunk and batch size for a budget (module docstring)."""
    if max_memory is None:
        free = available_memory(next(model.parameters()).device)
        budget = None if free is None else free // 2
    else:
        budget = parse_bytes(max_memory)
    want = n_examples if batch_size is None else min(batch_size, n_examples)
    d_model, n_heads = int(model.cfg.d_model), int(model.cfg.n_heads)

    def need(itemsize: int, chunk: int | None) -> int:
        return bytes_per_example(n_senders, seq, d_model, n_heads, itemsize, chunk)

    if budget is None or want * need(4, None) <= budget:
        return AttributionFit(batch_size, torch.float32, None, budget)
    dtype = next(model.parameters()).dtype
    chunk: int | None
    if dtype.is_floating_point and dtype.itemsize < 4:
        row = want * seq * d_model * 4  # one sender row upcast
        room = budget - want * need(dtype.itemsize, 1) + row
        chunk = min(n_senders // 2, room // row)
        if chunk >= 1:
            return AttributionFit(batch_size, dtype, int(chunk), budget)
        chunk = min(n_senders, _CHUNK)
        per_example = need(dtype.itemsize, chunk)
    else:
        dtype, chunk, per_example = torch.float32, None, need(4, None)
    micro = budget // per_example
    if micro < 1:
        raise ValueError(
            f"attribution needs about {per_example / 1e9:.3g} GB per example here (a buffer "
            f"of {n_senders} senders x {seq} positions x d_model {d_model}), more than "
            f"max_memory={budget / 1e9:.3g} GB; raise max_memory, shorten the prompts, or "
            "attribute a smaller model"
        )
    return AttributionFit(int(micro), dtype, chunk, budget)


__all__ = ["AttributionFit", "available_memory", "fit_attribution", "parse_bytes"]
