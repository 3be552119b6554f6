"""Circuit-tuning (arXiv 2502.06106): fine-tune a model only inside its task's circuit.

`CircuitTuner(model, task, TuneConfig(...)).run(out_dir)` runs this loop, for optimizer
steps ``t = 0 .. steps - 1``:

1. **Batch.** The rows of the training set for step ``t`` come from a permutation per epoch
   seeded by ``(seed, epoch)``: a pure function of ``t``, so a resumed run sees the same data.
2. **Discovery** (every ``every_k`` steps, circuit modes only). ``"batch"`` (the paper's):
   the training forward is recorded by the EAP kernel `ctlens.attribute` uses
   (`ctlens.attribution.EapKernel`: every sender's output, every receiver's input); the
   task metric on the training batch (or minus the loss) is differentiated with respect to
   the receiver inputs, and each edge gets ``(mean_s - a_s) . dM/dx_r`` summed
   over positions and examples, ``mean_s`` being the sender's per-position mean over the
   batch (padding excluded) -- EAP with mean ablation, at the price of one extra backward
   (none with ``batch_metric="loss"``). ``"task"``: `ctlens.attribute` on
   ``discovery_batches`` batches of the task's discovery pairs. Scores are optionally
   smoothed by an exponential moving average across rediscoveries, then the top-N edges
   (N from the schedule) form the circuit. ``mode="random"`` draws N random valid edges
   instead (seeded by ``(seed, t)``). A **fixed circuit** (``circuit=``, ``ctlens tune
   --circuit FILE``: a circuit found by any method) replaces discovery: it is entered once
   and kept (``mode="random"``: one random circuit matched to it as ``random_match`` says,
   drawn once), and ``run.json`` records its fingerprint, so a run resumes only with it.
3. **Update.** LM loss on the task's target tokens (+ ``metric_beta * |metric|``, + a user's
   ``extra_loss``). ``"gradient"``: `ctlens.restrict_gradients` (only circuit nodes'
   parameter slices move, frozen slices restored after every optimizer step). ``"forward"``:
   the training forward runs under `ctlens.edge_mask` (edges outside the circuit
   mean-ablated, means refreshed at each discovery). ``"both"``: both. ``"full"``: nothing
   is restricted. ``"lora"``: a peft copy is trained (`ctlens.tuning.lora`).
4. **Bookkeeping** after the step (``s = t + 1``): evaluate when ``s % eval_every == 0`` or
   at the end (target metric, general LM loss, other tasks' metrics, fraction of real
   parameters moved, circuit size; one circuit snapshot per evaluation; a line of
   ``metrics.jsonl``), checkpoint when ``s % save_every == 0`` or at the end. Step 0 is
   evaluated before training.

The pieces, each in its own module with its own state: `ctlens.tuning.discovery` (scores,
EMA, selection, the step -> N rule), `ctlens.tuning.enforcement` (the circuit in force,
gradient restriction, forward masks, the optimizer, the trainable fraction),
`ctlens.tuning.evaluation` (metrics records and snapshots), `ctlens.tuning.checkpoints`
(the prepare/resume protocol, checkpoints, export) over `ctlens.tuning.rundir` (the layout).
This module is the loop that drives them. The run directory format is
``docs/run-format.md``.

Positional runs (``TuneConfig(spans=True)``, ``docs/tuning.md``): the graph is the model's
over the task's token spans, so circuits hold (edge, span) pairs; each step hands its rows'
span labels (``train_data.spans``) to batch discovery and to the forward mask.

With ``torch.distributed`` initialised, every rank takes its shard of each global batch;
gradients, batch means and edge scores are summed across ranks
(`ctlens.tuning.distributed`), so all ranks select the same circuit and end with identical
weights; only rank 0 writes files. How the processes hold the model -- one process, data
parallel, or ``shard="fsdp"`` -- is the run's parallelism strategy
(`ctlens.tuning.parallel`), which owns the checks, wrapping, gathering, evaluation's
placement, start weights, gradient reduction and checkpoint writing; this loop asks it
and never branches on it. A rank that stops mid-run stops the others
(`World.peer_failures`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from ctlens import run_format as F
from ctlens.circuit import Circuit
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.scores import EdgeScores
from ctlens.tuning import checkpoints as C
from ctlens.tuning.checkpoint_state import CheckpointState
from ctlens.tuning.config import TuneConfig
from ctlens.tuning.discovery import CircuitDiscovery
from ctlens.tuning.distributed import World
from ctlens.tuning.enforcement import Enforcement
from ctlens.tuning.evaluation import Evaluator, eval_if_training
from ctlens.tuning.inputs import (
    check_fixed_circuit,
    check_lengths,
    check_task,
    task_spans,
    tuning_graph,
)
from ctlens.tuning.parallel import parallelism
from ctlens.tuning.precision import Precision
from ctlens.tuning.rundir import RunDir, now_iso
from ctlens.types import Ablation, Loss, Mode

ExtraLoss = Callable[[torch.Tensor, TaskData], torch.Tensor]
"""``fn(logits, batch) -> scalar`` added to the loss; ``batch`` holds the step's rows."""


@runtime_checkable
class TuneTask(Protocol):
    """What `CircuitTuner` needs from a task (`ctlens.tasks.Task` has all of it).

    ``train_data`` (a `TaskData` over the training rows, for ``"batch"`` discovery with the
    task metric and for ``metric_beta``), ``target_eval`` (default: the first key of
    ``evals``) and ``general_tokens`` / ``general_attention_mask`` may be ``None`` or absent.
    A positional run (``TuneConfig.spans``) needs ``train_data.spans``.
    """

    discovery: TaskData
    train_tokens: torch.Tensor
    train_target_mask: torch.Tensor
    train_attention_mask: torch.Tensor
    evals: Mapping[str, TaskData]


@dataclass(frozen=True)
class RunResult:
    """What `CircuitTuner.run` returns: the run directory and the last evaluation."""

    out_dir: Path
    metrics: dict[str, Any]
    model_dir: Path | None


class CircuitTuner:
    """Circuit-tuning runner. See the module docstring for the loop.

    Args:
        model: a bridge from `ctlens.load_model` (trained in place).
        task: a `ctlens.tasks.Task` or any object satisfying `TuneTask`.
        config: the run's `TuneConfig`.
        model_name: recorded in ``run.json`` (default: the name `load_model` gave the model).
        extra_loss: an extra loss term ``fn(logits, batch) -> scalar`` (not saved in the
            config: pass the same function when resuming).
        circuit: a fixed circuit to tune inside instead of discovering one (module
            docstring); a `Circuit` of this model's graph with the config's MLP grouping, in
            modes ``gradient``, ``forward``, ``both`` and ``random``.
        graph: the model's graph when the caller has built it already (``ctlens tune``
            does, to check the sizes before building the task): checked against the model
            and the config's MLP grouping, not rebuilt.
    """

    def __init__(
        self,
        model: Any,
        task: Any,
        config: TuneConfig | None = None,
        model_name: str | None = None,
        extra_loss: ExtraLoss | None = None,
        circuit: Circuit | None = None,
        graph: Graph | None = None,
    ) -> None:
        self.config = config or TuneConfig()
        if not isinstance(self.config, TuneConfig):
            raise TypeError(f"config must be a TuneConfig, got {type(self.config).__name__}")
        check_task(task)
        self.model = model
        self.task = task
        d_mlp = int(getattr(model.cfg, "d_mlp", 0) or 0)
        self.graph = tuning_graph(model, self.config.groups_for(d_mlp), graph,
                                  task_spans(task, self.config))
        self.config.top_n_ends(self.graph.n_edges)  # a count larger than the graph: refused
        n_train = task.train_tokens.shape[0]
        self.world = World.current()
        self.parallel = parallelism(model, self.config, self.world)
        """How the run's processes hold the model (`ctlens.tuning.parallel`)."""
        if n_train < 1:
            raise ValueError("the task has no training rows")
        vocab = model.cfg.d_vocab
        if int(task.train_tokens.max()) >= vocab or int(task.train_tokens.min()) < 0:
            raise ValueError(f"train_tokens hold ids outside the model's vocabulary of {vocab}")
        check_lengths(task, model.cfg.n_ctx)
        self.model_name = model_name or getattr(model.cfg, "model_name", None) or "external"
        self.task_name = str(getattr(task, "name", "custom"))
        self.target_eval = getattr(task, "target_eval", None) or next(iter(task.evals))
        self.train_data: TaskData | None = getattr(task, "train_data", None)
        self.extra_loss = extra_loss
        self.precision = Precision(self.config.precision, model)
        self._discover_next = False  # an fp16 overflow skipped the first discovery
        self.discovery = CircuitDiscovery(model, task, self.config, self.graph, self.world,
                                          self.model_name, task_world=self.parallel.task_world)
        self.evaluator = Evaluator(model, task, self.config, self.graph, self.target_eval)
        self.last_loss: float | None = None
        self.fixed_circuit = check_fixed_circuit(circuit, self.config, self.graph)

    # ------------------------------------------------------------------ public API

    def run(self, out_dir: str | Path, overwrite: bool = False) -> RunResult:
        """Run (or resume) the tuning in ``out_dir``; returns the last evaluation.

        An ``out_dir`` holding this run resumes from its newest checkpoint; one holding a
        different run (other model, task or config) is refused unless ``overwrite``, which
        removes only what a run owns (``docs/run-format.md``). The directory is locked
        for the run (`ctlens.dir_lock`): a second tuner on it stops at once.
        """
        rd = RunDir(Path(out_dir))
        lock = self.world.on_main("locking the run directory", rd.lock)
        try:
            return self._run(rd, overwrite)
        finally:
            if lock is not None:
                lock.release()

    def _run(self, rd: RunDir, overwrite: bool) -> RunResult:
        """`run`, with the run directory locked."""
        cfg = self.config
        start_step, wall_offset = self._prepare(rd, overwrite)
        parallel = self.parallel
        initial = parallel.start_weights(rd, self.model)
        state = None
        if start_step > 0:  # the weights load before the model is wrapped
            state = C.load_checkpoint(rd, start_step, self.model, self.graph, self.model_name,
                                      cfg)
        enforcement = Enforcement(self.model, cfg, parallel)
        started = time.perf_counter() - wall_offset
        last: dict[str, Any] = {}
        done = {r["step"] for r in rd.read_metrics()} if self.world.is_main else set()
        bar = tqdm(
            total=cfg.steps,
            initial=start_step,
            desc=f"circuit-tune ({cfg.mode})",
            disable=not (cfg.progress and self.world.is_main),
            unit="step",
        )

        def evaluate(step: int) -> dict[str, Any]:
            def measure(monitor: Circuit | None) -> tuple[dict[str, Any], Circuit]:
                return self.evaluator.measure(rd, step, initial, started, enforcement,
                                              self.discovery, self.last_loss, monitor)

            def write(record: dict[str, Any], circuit: Circuit) -> dict[str, Any]:
                bar.set_postfix(target=f"{record['target_metric']:.3f}",
                                general=f"{record['general_loss']:.3f}")
                return self.evaluator.write(rd, record, circuit)

            def monitor() -> Circuit:
                return self.discovery.monitor_circuit(step)

            in_force = enforcement.circuit is not None
            return parallel.evaluate(step, measure, write, None if in_force else monitor) or {}

        def save(step: int) -> None:
            wall = time.perf_counter() - started
            parallel.save_checkpoint(
                rd, self.model, enforcement.optimizer,
                lambda optimizer: self._checkpoint_state(step, wall, enforcement, scheduler,
                                                         optimizer),
                cfg.checkpoint_format, cfg.keep_checkpoints,
            )

        try:
            if start_step == 0 and 0 not in done:
                # before wrapping: step 0's monitor circuit runs a backward on rank 0 alone
                last = evaluate(0)
            if parallel.wrap(self.model):  # new parameters: a new optimizer
                enforcement.release()
                enforcement = Enforcement(self.model, cfg, parallel)
            scheduler = torch.optim.lr_scheduler.LambdaLR(enforcement.optimizer, cfg.lr_factor)
            if state is not None:
                self._resume(state, enforcement, scheduler, rd.checkpoint_dir(start_step))
            for t in range(start_step, cfg.steps):
                s = t + 1
                with self.world.peer_failures(f"running step {s}"):
                    self._train_step(t, enforcement, scheduler)
                    bar.update(1)
                    if s % cfg.eval_every == 0 or s == cfg.steps:
                        last = evaluate(s)
                    if s % cfg.save_every == 0 or s == cfg.steps:
                        save(s)
            if self.precision.skipped and self.world.is_main:  # one warning, with the count
                warnings.warn(self.precision.skipped_warning(cfg.steps - start_step), stacklevel=3)
            model_dir = None
            if cfg.export:
                with parallel.gathered():
                    model_dir = self.world.on_main(
                        "exporting the model",
                        lambda: C.export_model(rd, self.model, enforcement.lora),
                    )
        finally:
            bar.close()
            enforcement.release()
        if not last and self.world.is_main:
            records = rd.read_metrics()
            last = records[-1] if records else {}
        return RunResult(rd.root, last, model_dir)

    def time_steps(self, n_steps: int, warmup: int = 2) -> list[float]:
        """Seconds per optimizer step for ``n_steps`` steps after ``warmup`` untimed ones.

        Trains the model in memory (no run directory, no evaluation): a benchmark helper,
        unsharded only.
        """
        self.parallel.check_time_steps()
        enforcement = Enforcement(self.model, self.config, self.parallel)
        scheduler = torch.optim.lr_scheduler.LambdaLR(enforcement.optimizer,
                                                      self.config.lr_factor)
        times = []
        try:
            for t in range(warmup + n_steps):
                start = time.perf_counter()
                self._train_step(t, enforcement, scheduler)
                if t >= warmup:
                    times.append(time.perf_counter() - start)
        finally:
            enforcement.release()
        return times

    def batch_scores(self, step: int = 0) -> EdgeScores:
        """Edge scores of ``"batch"`` discovery on step ``step``'s training batch (no update).

        Summed across ranks under ``torch.distributed``: equal to the single-process scores
        of the concatenated global batch.
        """
        scores, _ = self._batch_discovery(step)
        return EdgeScores(scores, self.graph, {"method": "eap", "ablation": Ablation.MEAN.value,
                                               "discovery": "batch", "step": step})

    def _random_circuit(self, t: int) -> Circuit:
        """``mode="random"``'s circuit of step ``t``, matched as ``random_match`` says (to
        the fixed circuit, if any, else to the one discovery selects)."""
        fixed = self.fixed_circuit
        if self.config.random_match == "edges":
            return self.discovery.random_circuit(t, None if fixed is None else fixed.n_edges)
        if fixed is not None:
            target = fixed
        elif self.config.discovery == "task":
            target = self.discovery.select(self.discovery.task_scores(t), t)
        else:
            target = self.discovery.select(self._batch_discovery(t)[0], t)
        # the parameter rules' counts read whole parameters (every model, not only GPT-2)
        with self.parallel.gathered():
            return self.discovery.matched_random_circuit(target, t)

    def _batch_discovery(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``"batch"`` discovery's scores and batch means on step ``step``, no update."""
        local = self._local_rows(step)
        tokens = self.task.train_tokens[local]
        with eval_if_training(self.model):
            with self.precision.forward():
                logits, kernel = self.discovery.recorded_forward(tokens, self._spans(local))
            loss, metric_sum = self._loss(logits.float(), local)
            scores, means, _ = self._scores_of(kernel, local, loss, metric_sum, False)
        return scores, means

    def _scores_of(
        self, kernel: Any, local: torch.Tensor, loss: torch.Tensor,
        metric_sum: torch.Tensor | None, training: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """`CircuitDiscovery.batch_scores`. Only a backward shared with the optimizer step
        (the loss's while ``training``) goes through the loss scale (``fp16``), its scores
        unscaled; discovery's own backward runs unscaled (`ctlens.tuning.precision`)."""
        shared = training and (self.config.batch_metric == "loss" or metric_sum is None)
        scores, means, done = self.discovery.batch_scores(
            kernel, local, self.precision.scale(loss) if shared else loss, metric_sum,
            training,
        )
        return self.precision.unscale_scores(scores) if shared else scores, means, done

    def _skip_step(self, enforcement: Enforcement, scheduler: Any, scaled: bool) -> None:
        """Skip this step's update: its fp16 edge scores overflowed. The circuit in force
        before stays (with none yet, the next step discovers again), the skip is counted
        (`Precision.skip`; the run warns at its end) and the schedule moves on."""
        enforcement.optimizer.zero_grad(set_to_none=True)
        if enforcement.circuit is not None:
            enforcement.enter(enforcement.circuit)
        else:
            self._discover_next = True
        self.precision.skip(scaled)
        scheduler.step()

    # ------------------------------------------------------------------ the run directory

    def _prepare(self, rd: RunDir, overwrite: bool) -> tuple[int, float]:
        """Check or create the run directory; return ``(start_step, wall_time_so_far)``.

        Rank 0 does the file work (`ctlens.tuning.checkpoints.prepare_run`); an error there
        stops every rank (``World.on_main``).
        """
        prepared = self.world.on_main(
            "preparing the run directory",
            lambda: C.prepare_run(rd, self.model, self._run_doc(), self.config, overwrite),
        )
        start, wall = prepared if prepared is not None else (0, 0.0)
        start = self.world.broadcast_int(start)
        if start == 0:
            self.parallel.share_start_weights(rd, self.model)
        return start, wall

    def _run_doc(self) -> dict[str, Any]:
        from ctlens._version import __version__

        return {
            "format": F.FORMAT,
            "version": F.VERSION,
            "model": self.model_name,
            "task": self.task_name,
            "graph": self.graph.spec.to_dict(),
            "config": self.config.to_dict(),
            "created": now_iso(),
            "ctlens_version": __version__,
            **self.parallel.run_record(self.model),
            "data": C.data_record(self.task, self.graph.positional),
            **C.fixed_circuit_record(self.fixed_circuit),
        }

    def _checkpoint_state(
        self, step: int, wall_time: float, enforcement: Enforcement, scheduler: Any,
        optimizer: dict[str, Any],
    ) -> CheckpointState:
        """``state.pt`` of step ``step``, with ``optimizer`` as the parallelism writes it."""
        lora = enforcement.lora
        return CheckpointState(
            step=step, wall_time=wall_time, optimizer=optimizer,
            scheduler=scheduler.state_dict(), torch_rng=torch.get_rng_state(),
            ema=self.discovery.ema, means=enforcement.means, last_loss=self.last_loss,
            circuit=enforcement.circuit,
            lora=None if lora is None else lora.adapter_state(), config=self.config,
            scaler=self.precision.state(),
        )

    def _resume(
        self, state: CheckpointState, enforcement: Enforcement, scheduler: Any, folder: Path
    ) -> None:
        """Restore the loop, discovery and enforcement from checkpoint ``folder``'s state."""
        self.parallel.load_optimizer(enforcement.optimizer, self.model, state.optimizer,
                                     folder)
        scheduler.load_state_dict(state.scheduler)
        self.precision.load_state(state.scaler)
        torch.set_rng_state(state.torch_rng)
        self.discovery.ema = state.ema
        enforcement.means = state.means
        self.last_loss = state.last_loss
        if enforcement.lora is not None and state.lora is not None:
            enforcement.lora.load_adapter_state(state.lora)
        if state.circuit is not None:
            enforcement.enter(state.circuit)

    # ------------------------------------------------------------------ data

    def _global_rows(self, step: int) -> torch.Tensor:
        """Training rows of step ``step``: a seeded permutation per epoch, cycled."""
        n = self.task.train_tokens.shape[0]
        b = self.config.batch_size
        start = step * b
        rows = []
        while len(rows) < b:
            epoch, offset = divmod(start + len(rows), n)
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            rows.extend(perm[offset : offset + b - len(rows)].tolist())
        return torch.tensor(rows, dtype=torch.long)

    def _local_rows(self, step: int) -> torch.Tensor:
        return self.world.shard(self._global_rows(step))

    def _spans(self, local: torch.Tensor) -> torch.Tensor | None:
        """The span labels ``[batch, seq]`` of training rows ``local`` (positional runs; the
        forward mask and batch discovery read them), else None."""
        if not self.graph.positional:
            return None
        assert self.train_data is not None and self.train_data.spans is not None
        return self.train_data.spans[local]

    # ------------------------------------------------------------------ one step

    def _train_step(self, t: int, enforcement: Enforcement, scheduler: Any) -> None:
        """One optimizer step, with discovery first when ``t % every_k == 0``.

        On a discovery step the previous restriction is lifted before the forward (so every
        parameter is in the autograd graph); with ``"batch"`` discovery in gradient modes the
        new circuit's restriction is entered after the backward and applied to the
        gradients explicitly (`Enforcement.mask_grads`); between discoveries the
        restriction's gradient hooks do it.
        """
        cfg = self.config
        local = self._local_rows(t)
        tokens = self.task.train_tokens[local]
        discover = cfg.uses_circuit and (t % cfg.every_k == 0 or self._discover_next)
        self._discover_next = False
        if self.fixed_circuit is not None:  # entered once (a resumed run has it in force)
            discover = enforcement.circuit is None
        record = False
        if discover:
            enforcement.release()
            if cfg.mode is Mode.RANDOM:
                enforcement.enter(self._random_circuit(t))
            elif self.fixed_circuit is not None:
                enforcement.enter(self.fixed_circuit)
                if cfg.mode.masks_forward:
                    enforcement.means = self.discovery.training_means(self._global_rows(t))
            elif cfg.discovery == "task":
                enforcement.enter(self.discovery.select(self.discovery.task_scores(t), t))
                if cfg.mode.masks_forward:
                    enforcement.means = self.discovery.training_means(self._global_rows(t))
            elif cfg.mode.masks_forward:
                # the circuit (and its means) must be known before the masked forward
                scores, means = self._batch_discovery(t)
                if self.precision.overflowed(scores, self.graph.dense_valid):
                    return self._skip_step(enforcement, scheduler, scaled=False)
                enforcement.enter(self.discovery.select(scores, t), means)
            else:
                record = True
        optimizer = enforcement.optimizer
        optimizer.zero_grad(set_to_none=True)
        spans = self._spans(local)
        with eval_if_training(self.model), enforcement.forward_mask(spans):
            kernel = None
            with self.precision.forward():  # the backward runs outside autocast
                if enforcement.lora is not None:
                    logits = enforcement.lora.logits(tokens)
                elif record:
                    logits, kernel = self.discovery.recorded_forward(tokens, spans)
                else:
                    logits = self.model(tokens)
            loss, metric_sum = self._loss(logits.float(), local)
            if kernel is not None:
                scores, means, backward_done = self._scores_of(kernel, local, loss, metric_sum,
                                                               True)
                if self.precision.overflowed(scores, self.graph.dense_valid):
                    return self._skip_step(enforcement, scheduler, scaled=backward_done)
                if not backward_done:
                    self.precision.scale(loss).backward()
                enforcement.enter(self.discovery.select(scores, t), means)
                enforcement.mask_grads()
            else:
                self.precision.scale(loss).backward()
        del logits, kernel
        self.last_loss = self.world.sum_scalar(float(loss.detach()))
        self.parallel.sum_gradients(enforcement.params)
        enforcement.after_backward()
        self.precision.step(optimizer, enforcement.params, cfg.grad_clip)
        scheduler.step()

    def _loss(
        self, logits: torch.Tensor, local: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training loss (normalised by global counts) and the batch's summed task metric."""
        task, cfg = self.task, self.config
        tokens = task.train_tokens[local].to(logits.device)
        if cfg.loss is Loss.SEQUENCE:  # every real token predicted from a real token
            real = task.train_attention_mask[local].to(logits.device)
            target = real[:, 1:] & real[:, :-1]
        else:
            target = task.train_target_mask[local][:, 1:].to(logits.device)
        n_targets = self.world.sum_scalar(float(target.sum()))
        n_rows = self.world.sum_scalar(float(len(local)))
        logp = logits[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
        loss = (nll * target).sum() / max(n_targets, 1.0)
        metric_sum = None
        need_metric = cfg.metric_beta > 0 or (
            cfg.discovery == "batch" and cfg.batch_metric == "task" and cfg.uses_circuit
        )
        batch = self.train_data[local] if self.train_data is not None else None
        if need_metric and batch is not None:
            metric_sum = batch.metric_values(logits, logits.detach()).sum()
        if cfg.metric_beta > 0:
            if metric_sum is None:
                raise ValueError("metric_beta needs task.train_data (the training rows' metric)")
            mean = self.world.sum_scalar(float(metric_sum.detach())) / n_rows
            # d|m|/dtheta = sign(m) dm/dtheta, with m the global batch mean
            loss = loss + cfg.metric_beta * math.copysign(1.0, mean) * metric_sum / n_rows
        if self.extra_loss is not None:
            if batch is None:
                batch = TaskData(clean=tokens, attention_mask=task.train_attention_mask[local],
                                 metric="kl")
            loss = loss + self.extra_loss(logits, batch) * len(local) / n_rows
        return loss, metric_sum
