"""Evaluation: one ``metrics.jsonl`` record and one circuit snapshot per evaluation.

`Evaluator.measure` measures the current weights (the task's target metric and accuracy,
the other tasks' metrics, the held-out general LM loss, the fraction of real parameters
moved since the start, and in forward modes the target metric with the circuit enforced);
`Evaluator.write` saves the circuit snapshot (the circuit in force, or in ``full`` /
``lora`` runs and at step 0 the monitor circuit of the current weights) and appends the
record. The keys are those of ``docs/run-format.md``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ctlens.bridge.hooks import eval_mode
from ctlens.circuit import Circuit
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.tuning import weights as W
from ctlens.tuning.config import TuneConfig
from ctlens.tuning.discovery import CircuitDiscovery, top_n_after
from ctlens.tuning.enforcement import Enforcement
from ctlens.tuning.parallel.local_shards import StartWeights
from ctlens.tuning.rundir import RunDir
from ctlens.types import Ablation

if TYPE_CHECKING:
    from ctlens.masking.forward import EdgeMask


class Evaluator:
    """Evaluates one run's model on its task (see the module docstring).

    Args:
        model: the bridge being tuned.
        task: the run's task; ``target_eval`` names its target evaluation set.
        config: the run's configuration.
        graph: the model's graph.
        target_eval: the key of ``task.evals`` holding the target metric.
    """

    def __init__(
        self, model: Any, task: Any, config: TuneConfig, graph: Graph, target_eval: str
    ) -> None:
        self.model = model
        self.task = task
        self.config = config
        self.graph = graph
        self.target_eval = target_eval

    @torch.no_grad()
    def measure(
        self,
        rd: RunDir,
        step: int,
        initial: list[torch.Tensor] | StartWeights,
        started: float,
        enforcement: Enforcement,
        discovery: CircuitDiscovery,
        train_loss: float | None,
        monitor: Circuit | None = None,
    ) -> tuple[dict[str, Any], Circuit]:
        """The record of step ``step`` and its circuit (to be saved in ``rd``).

        ``initial``: the start weights, whole (`ctlens.tuning.weights.snapshot`) or read from
        the run's file (`StartWeights`). ``monitor``: the snapshot circuit outside circuit
        modes, when the caller found it already (a sharded model scores it on every rank:
        one rank alone cannot run FSDP's backward); otherwise ``discovery.monitor_circuit``
        finds it here. Writes nothing. On a sharded model without gathering
        (`ctlens.tuning.parallel.sharding.local_paths`) every rank must call it (its forwards
        and ``params_moved`` are collectives); all get the same record.
        """
        cfg = self.config
        if enforcement.lora is not None:
            enforcement.lora.mirror()
        with eval_if_training(self.model):
            evals, accuracy = {}, {}
            for name, data in self.task.evals.items():
                evals[name], accuracy[name] = self.metric_mean(data)
            target = evals.pop(self.target_eval)
            target_accuracy = accuracy.pop(self.target_eval)
            general = self.general_loss()
            masked = self.masked_target(enforcement)
        in_force = enforcement.circuit
        if in_force is not None:
            circuit = in_force
        else:
            circuit = monitor if monitor is not None else discovery.monitor_circuit(step)
        record: dict[str, Any] = {
            "step": step,
            "target_metric": target,
            "general_loss": general,
            "circuit_edges": circuit.n_edges if cfg.uses_circuit else self.graph.n_edges,
            "params_moved": initial.moved_fraction(self.model)
            if isinstance(initial, StartWeights) else W.moved_fraction(self.model, initial),
            "evals": evals,
            "wall_time": time.perf_counter() - started,
            "lr": cfg.lr * cfg.lr_factor(max(step - 1, 0)),
            "top_n": top_n_after(cfg, step, self.graph.n_edges),
            "trainable_fraction": enforcement.trainable_fraction(),
        }
        matched = (in_force.metadata or {}).get("discovered_trainable_fraction") \
            if in_force is not None else None
        if matched is not None:
            record["discovered_trainable_fraction"] = matched
        if target_accuracy is not None:
            record["target_accuracy"] = target_accuracy
        known = {k: v for k, v in accuracy.items() if v is not None}
        if known:
            record["evals_accuracy"] = known
        if masked is not None:
            record["target_metric_masked"] = masked
        if train_loss is not None and step > 0:
            record["train_loss"] = train_loss
        record["circuit_file"] = str(rd.circuit_file(step).relative_to(rd.root))
        record["circuit_source"] = "in_force" if in_force is not None else "monitor"
        return record, circuit

    def write(self, rd: RunDir, record: dict[str, Any], circuit: Circuit) -> dict[str, Any]:
        """Save a `measure` record's circuit snapshot and append the record to
        ``metrics.jsonl`` (rank 0's work); returns the record as written."""
        step = record["step"]
        with rd.writing(f"the evaluation of step {step}", "the checkpoints are unchanged"):
            circuit.save(rd.circuit_file(step))
            rd.append_metrics(record)
        return record

    def metric_mean(
        self, data: TaskData, mask: EdgeMask | None = None
    ) -> tuple[float, float | None]:
        """Mean metric over an evaluation set and, for difference metrics, the fraction > 0.
        ``mask``: the `ctlens.masking.EdgeMask` of a positional circuit in force, told each
        batch's span labels."""
        if self.config.eval_examples is not None:
            data = data[: self.config.eval_examples]
        values = []
        for batch in data.batches(max(32, self.config.batch_size)):
            batch = batch.trimmed()
            if mask is not None:
                mask.set_spans(batch.spans)
            logits = self.model(batch.clean)
            values.append(batch.metric_values(logits, logits).float().cpu())
        v = torch.cat(values)
        accuracy = float((v > 0).float().mean()) if data.metric in ("logit_diff", "prob_diff") \
            else None
        return float(v.mean()), accuracy

    def masked_target(self, enforcement: Enforcement) -> float | None:
        """Forward modes: the target metric with the circuit enforced (means: the eval set)."""
        if not self.config.mode.masks_forward or enforcement.circuit is None:
            return None
        from ctlens.masking import edge_mask

        data = self.task.evals[self.target_eval]
        if self.config.eval_examples is not None:
            data = data[: self.config.eval_examples]
        with edge_mask(self.model, enforcement.circuit, ablation=Ablation.MEAN,
                       reference=data) as mask:
            return self.metric_mean(data, mask if mask.graph.positional else None)[0]

    def general_loss(self) -> float:
        """Mean next-token loss on the first ``general_examples`` rows of the task's general
        corpus (all with ``None``; NaN when it has none)."""
        tokens = getattr(self.task, "general_tokens", None)
        if tokens is None:
            return float("nan")
        mask = getattr(self.task, "general_attention_mask", None)
        if mask is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        rows = self.config.general_examples
        if rows is not None:
            tokens, mask = tokens[:rows], mask[:rows]
        nll_sum, count = 0.0, 0.0
        for start in range(0, tokens.shape[0], 32):
            chunk, m = tokens[start : start + 32], mask[start : start + 32]
            logits = self.model(chunk)
            logp = logits[:, :-1].float().log_softmax(-1)
            nll = -logp.gather(-1, chunk[:, 1:, None])[..., 0]
            valid = (m[:, 1:] & m[:, :-1]).float()
            nll_sum += float((nll * valid).sum())
            count += float(valid.sum())
        return nll_sum / max(count, 1.0)


@contextlib.contextmanager
def eval_if_training(model: Any) -> Iterator[None]:
    """`ctlens.bridge.hooks.eval_mode`, skipped when the model is already in eval mode.

    Switching a bridge's mode walks hundreds of hook modules; the tuner would pay that twice
    per step for nothing (`load_model` returns models in eval mode).
    """
    if not model.training:
        yield
        return
    with eval_mode(model):
        yield
