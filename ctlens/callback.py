"""Circuit-tuning inside HuggingFace's ``Trainer``: `CircuitTuningCallback`.

A `Trainer` owns the loop: it never shows callbacks the batch, and it clips gradients
before ``on_pre_optimizer_step``. So the callback does what `CircuitTuner` does with
``discovery="task"`` from the two places a callback can act:

- ``on_step_begin`` (before the step's forward), every ``every_k`` optimizer steps: score
  the task's discovery pairs with EAP (as `CircuitTuner` does: ``discovery_batches``
  batches from a rotating offset, the configured ablation), select the circuit with the
  tuner's own rule (`ctlens.tuning.discovery.CircuitSelection`: the moving average, then
  the top N of the `TuneConfig` schedule by ``selection``) and enter
  `ctlens.restrict_gradients` for the new circuit, given the trainer's optimizer. The
  restriction's gradient hooks zero the frozen entries as the gradients are computed, so
  clipping and the optimizer see restricted gradients, and its optimizer post-hook copies
  frozen slices back after every step (exact under momentum and weight decay).
- ``on_train_end``: leave the restriction (flags and hooks restored).

The model the trainer runs must compute through the bridge (``ctlens.load_model``), whose
parameters the restriction holds; `BridgeCausalLM` wraps a bridge as a module that returns
an HF-style causal-LM loss, so ``Trainer(model=BridgeCausalLM(bridge), ...)`` works.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.modeling_outputs import CausalLMOutput

from ctlens.circuit import Circuit
from ctlens.graph import Graph
from ctlens.tuning.config import TuneConfig
from ctlens.tuning.discovery import CircuitSelection, task_scores
from ctlens.tuning.distributed import World


class BridgeCausalLM(torch.nn.Module):
    """A bridge as a `Trainer`-ready causal LM: ``forward(input_ids, labels=...)`` -> loss.

    The loss is the mean next-token negative log-likelihood over the label positions that
    are not ``-100`` (HF's convention), computed in fp32 as `CircuitTuner` computes it, so
    labels ``tokens`` masked to ``-100`` outside the targets give the tuner's loss.
    """

    def __init__(self, bridge: Any) -> None:
        super().__init__()
        self.bridge = bridge
        self.config = getattr(bridge.original_model, "config", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits of ``input_ids``; with ``labels``, the loss too (``attention_mask`` unused:
        the tuner's batches are right-padded, and padding carries no label)."""
        logits = self.bridge(input_ids)
        loss = None
        if labels is not None:
            target = labels[:, 1:]
            keep = target != -100
            logp = logits[:, :-1].float().log_softmax(-1)
            nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
            loss = (nll * keep).sum() / keep.sum().clamp(min=1)
        return CausalLMOutput(loss=loss, logits=logits)


class CircuitTuningCallback(TrainerCallback):
    """Restrict a `Trainer`'s updates to a circuit rediscovered every ``every_k`` steps.

    Args:
        model: the bridge (`ctlens.load_model`) whose parameters the trainer updates.
        discovery: the task's discovery pairs (a `TaskData`), or a task with a
            ``discovery`` attribute (`ctlens.tasks.load`).
        config: a `TuneConfig`; read are ``top_n`` and its schedule, ``steps`` (for the
            schedule), ``every_k``, ``batch_size``, ``discovery_batches``,
            ``discovery_ablation``, ``ema``, ``selection``, ``train_embeddings``,
            ``train_unembedding``, ``spans`` (positional circuits over the discovery
            data's spans; a node moves when it is in the circuit at any span).
            Only ``mode="gradient"`` is supported (the forward pass belongs to the trainer).

    Attributes:
        circuit: the circuit in force (``None`` before the first step).
        history: ``(step, number of edges)`` of every rediscovery.
    """

    def __init__(self, model: Any, discovery: Any, config: TuneConfig | None = None) -> None:
        from ctlens.data import TaskData

        self.config = config or TuneConfig(discovery="task")
        if not isinstance(self.config, TuneConfig):
            raise TypeError(f"config must be a TuneConfig, got {type(self.config).__name__}")
        if self.config.mode != "gradient":
            raise ValueError(
                f"CircuitTuningCallback restricts gradients only (mode='gradient'); got "
                f"mode={self.config.mode.value!r}: forward masking needs the trainer's forward "
                "pass, use CircuitTuner for it"
            )
        data = getattr(discovery, "discovery", discovery)
        if not isinstance(data, TaskData):
            raise TypeError(
                "discovery must be a ctlens.TaskData or a task with a .discovery TaskData, "
                f"got {type(discovery).__name__}"
            )
        self.model = model
        self.data = data
        d_mlp = int(getattr(model.cfg, "d_mlp", 0) or 0)
        self.graph = Graph.from_model(model, mlp_groups=self.config.groups_for(d_mlp),
                                      spans=data if self.config.spans else None)
        self.config.top_n_ends(self.graph.n_edges)  # a count larger than the graph: refused
        self.circuit: Circuit | None = None
        self.history: list[tuple[int, int]] = []
        self._selection = CircuitSelection(self.config, self.graph, None, discovery="task")
        self._stack: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ trainer events

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Rediscover and restrict before the forward of every ``every_k``-th step."""
        t = int(state.global_step)
        if t % self.config.every_k:
            return
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError("the trainer passed no optimizer to CircuitTuningCallback")
        self.set_circuit(self.discover(t), optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Lift the restriction (hooks removed, ``requires_grad`` flags restored)."""
        self.release()

    # ------------------------------------------------------------------ the work

    def discover(self, t: int) -> Circuit:
        """The circuit of optimizer step ``t``: EAP on the discovery pairs, then the tuner's
        selection (`ctlens.tuning.discovery.CircuitSelection`)."""
        scores = task_scores(self.model, self.data, self.config, self.graph, t,
                             World.current())
        circuit = self._selection.select(scores, t)
        self.history.append((t, circuit.n_edges))
        return circuit

    def set_circuit(self, circuit: Circuit, optimizer: torch.optim.Optimizer) -> None:
        """Restrict updates to ``circuit`` from now on (the previous restriction is lifted)."""
        from ctlens.masking import restrict_gradients

        self.release()
        # accelerate wraps the optimizer; the step post-hook must sit on the real one
        inner = getattr(optimizer, "optimizer", optimizer)
        stack = contextlib.ExitStack()
        stack.enter_context(restrict_gradients(
            self.model, circuit, optimizer=inner,
            train_embeddings=self.config.train_embeddings,
            train_unembedding=self.config.train_unembedding,
        ))
        self._stack = stack
        self.circuit = circuit

    def release(self) -> None:
        """Leave the current restriction, if any."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None
