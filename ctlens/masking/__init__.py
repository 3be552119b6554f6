"""Enforce a circuit on a model: forward edge ablation, faithfulness and gradient restriction.

One module per job:

- `ctlens.masking.forward`: `edge_mask` and its handle `EdgeMask` - inside, the model
  computes the function with every edge outside the circuit ablated, exactly, while
  gradients still flow;
- `ctlens.masking.evaluate`: `faithfulness`, `faithfulness_curve` and `curve_areas` - how
  much of the task a circuit keeps, measured with those forward masks;
- `ctlens.masking.rules`: `parameter_rules` - which parameter slices each circuit node owns,
  as a table of per-node-kind rules;
- `ctlens.masking.gradients`: `restrict_gradients` and its handle `GradientRestriction` -
  inside, only the slices that the rules open can change.

Every public name is importable from ``ctlens.masking`` itself (and the main ones from
``ctlens``). The reference an ablation uses (``ablation=``, ``reference=``) is resolved by
`ctlens.attribution.resolve_reference`, the same resolver `ctlens.attribute` uses.
"""

from ctlens.masking.evaluate import (
    MIB_FRACTIONS,
    FaithfulnessCurve,
    FaithfulnessResult,
    curve_areas,
    faithfulness,
    faithfulness_curve,
)
from ctlens.masking.forward import EdgeMask, edge_mask
from ctlens.masking.gradients import GradientRestriction, restrict_gradients
from ctlens.masking.rules import ParameterRule, parameter_rules

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
