"""ctlens: find the circuit a transformer uses for a task, fine-tune inside it, watch it change.

The data flow, one module per stage::

    load_model (model)  ->  attribute (attribution)  ->  Circuit (circuit)
        ->  edge_mask / restrict_gradients (masking)  ->  CircuitTuner (tuning)  ->  viz
"""

from ctlens import tasks as tasks
from ctlens import viz as viz
from ctlens import zoo as zoo
from ctlens.attribution import attribute, mean_activations
from ctlens.callback import CircuitTuningCallback
from ctlens.circuit import Circuit
from ctlens.data import TaskData
from ctlens.graph import Graph, GraphSpec
from ctlens.masking import (
    edge_mask,
    faithfulness,
    faithfulness_curve,
    restrict_gradients,
)
from ctlens.model import UnsupportedModelError, load_model
from ctlens.plan import plan
from ctlens.scores import EdgeScores
from ctlens.tuning import CircuitTuner, TuneConfig
from ctlens.types import Ablation, Method, Node, NodeKind

__version__ = "0.1.0"

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
    "attribute",
    "edge_mask",
    "faithfulness",
    "faithfulness_curve",
    "restrict_gradients",
    "load_model",
    "mean_activations",
    "plan",
    "tasks",
    "viz",
    "zoo",
    "__version__",
]
