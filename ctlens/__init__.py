"""ctlens: find the circuit a transformer uses for a task, fine-tune inside it, watch it change.

The data flow, one module per stage::

    load_model (model)  ->  attribute (attribution)  ->  Circuit (circuit)
        ->  edge_mask / restrict_gradients (masking)  ->  CircuitTuner (tuning)  ->  viz

``import ctlens`` is cheap: each public name below is imported from its module the first
time it is used (``ctlens.attribute`` loads torch and the attribution code, ``ctlens.viz``
loads plotly, ``ctlens.CircuitTuner`` the tuner). Library code imports from the defining
modules, never from this face.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctlens._lazy import lazy_exports
from ctlens._version import __version__

if TYPE_CHECKING:  # what the lazy table serves, for type checkers and the API docs
    from ctlens import tasks, viz, zoo
    from ctlens.attribution import attribute, mean_activations
    from ctlens.callback import CircuitTuningCallback
    from ctlens.circuit import Circuit
    from ctlens.data import TaskData
    from ctlens.graph import Graph, GraphSpec
    from ctlens.learning import learn_circuit
    from ctlens.masking import edge_mask, faithfulness, faithfulness_curve, restrict_gradients
    from ctlens.model import UnsupportedModelError, load_model
    from ctlens.planner import plan
    from ctlens.scores import EdgeScores
    from ctlens.tuning import CircuitTuner, TuneConfig
    from ctlens.types import Ablation, Method, Node, NodeKind

_EXPORTS: dict[str, str] = {
    "Ablation": "ctlens.types",
    "Circuit": "ctlens.circuit",
    "CircuitTuner": "ctlens.tuning",
    "CircuitTuningCallback": "ctlens.callback",
    "EdgeScores": "ctlens.scores",
    "Graph": "ctlens.graph",
    "GraphSpec": "ctlens.graph",
    "Method": "ctlens.types",
    "Node": "ctlens.types",
    "NodeKind": "ctlens.types",
    "TaskData": "ctlens.data",
    "TuneConfig": "ctlens.tuning",
    "UnsupportedModelError": "ctlens.model",
    "attribute": "ctlens.attribution",
    "edge_mask": "ctlens.masking",
    "faithfulness": "ctlens.masking",
    "faithfulness_curve": "ctlens.masking",
    "learn_circuit": "ctlens.learning",
    "load_model": "ctlens.model",
    "mean_activations": "ctlens.attribution",
    "plan": "ctlens.planner",
    "restrict_gradients": "ctlens.masking",
    "tasks": "ctlens.tasks:",
    "viz": "ctlens.viz:",
    "zoo": "ctlens.zoo:",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "Ablation",
    "Circuit",
    "CircuitTuner",
    "CircuitTuningCallback",
    "EdgeScores",
    "Graph",
    "GraphSpec",
    "Method",
    "Node",
    "NodeKind",
    "TaskData",
    "TuneConfig",
    "UnsupportedModelError",
    "__version__",
    "attribute",
    "edge_mask",
    "faithfulness",
    "faithfulness_curve",
    "learn_circuit",
    "load_model",
    "mean_activations",
    "plan",
    "restrict_gradients",
    "tasks",
    "viz",
    "zoo",
]
