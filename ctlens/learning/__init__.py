"""Learned circuits: a gate per edge, trained for faithfulness under a size target.

- `ctlens.learning.gates`: `GatedForward`, the hooks that scale every edge by a gate in
  [0, 1] (1 keeps it, 0 ablates it exactly as `ctlens.edge_mask` does), differentiable in
  the gates, and the hard-concrete gate distribution;
- `ctlens.learning.span_gates`: `SpanGatedForward`, the same with one gate per (edge, token
  span) of a positional graph (0 ablates the pair at its span's positions, as a positional
  circuit's `ctlens.edge_mask` does);
- `ctlens.learning.learn`: `learn_circuit` (also ``ctlens.learn_circuit``), Edge Pruning's
  training loop on a frozen model, returning a `ctlens.Circuit`.
"""

from ctlens.learning.gates import GatedForward, open_probability, sample_gates
from ctlens.learning.learn import OBJECTIVES, TargetNotReachedError, learn_circuit
from ctlens.learning.span_gates import SpanGatedForward

__all__ = [
    "OBJECTIVES",
    "GatedForward",
    "SpanGatedForward",
    "TargetNotReachedError",
    "learn_circuit",
    "open_probability",
    "sample_gates",
]
