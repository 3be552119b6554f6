"""Circuit-tuning (arXiv 2502.06106): fine-tune a model only inside its task's circuit.

`CircuitTuner(model, task, TuneConfig(...)).run(out_dir)` runs this loop, for optimizer
steps ``t = 0 .. steps - 1``:

1. **Batch.** The rows of the training set for step ``t`` come from a permutation per epoch
   seeded by ``(seed, epoch)``: a pure function of ``t``, so a resumed run sees the same data.
2. **Discovery** (every ``every_k`` steps, circuit modes only). ``"batch"`` (the paper's):
   the training forward also records every sender's output and keeps every receiver's
   input; the task metric on the training batch (or minus the loss) is differentiated with
   respect to the receiver inputs, and each edge gets ``(mean_s - a_s) . dM/dx_r`` summed
   over positions and examples, ``mean_s`` being the sender's per-position mean over the
   batch (padding excluded) -- EAP with mean ablation, at the price of one extra backward
   (none with ``batch_metric="loss"``). ``"task"``: `ctlens.attribute` on
   ``discovery_batches`` batches of the task's discovery pairs. Scores are optionally
   smoothed by an exponential moving average across rediscoveries, then the top-N edges
   (N from the schedule) form the circuit. ``mode="random"`` draws N random valid edges
   instead (seeded by ``(seed, t)``).
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

The run directory format is ``docs/run-format.md``. With ``torch.distributed`` initialised,
every rank takes its shard of each global batch; gradients, batch means and edge scores are
summed across ranks (`ctlens.tuning.distributed`), so all ranks select the same circuit and
end with identical weights; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from ctlens import run_format as F
from ctlens.attribution import EapKernel, attribute, mean_activations
from ctlens.circuit import Circuit
from ctlens.data import TaskData
from ctlens.graph import Graph
from ctlens.hooks import eval_mode
from ctlens.scores import EdgeScores
from ctlens.tuning import weights as W
from ctlens.tuning.config import TuneConfig
from ctlens.tuning.distributed import World
from ctlens.tuning.rundir import (
    RunConflictError,
    RunDir,
    load_torch,
    now_iso,
    save_torch,
)

ExtraLoss = Callable[[torch.Tensor, TaskData], torch.Tensor]
"""``fn(logits, batch) -> scalar`` added to the loss; ``batch`` holds the step's rows."""


@runtime_checkable
class TuneTask(Protocol):
    """What `CircuitTuner` needs from a task (`ctlens.tasks.Task` has all of it).

    ``train_data`` (a `TaskData` over the training rows, for ``"batch"`` discovery with the
    task metric and for ``metric_beta``), ``target_eval`` (default: the first key of
    ``evals``) and ``general_tokens`` / ``general_attention_mask`` may be ``None`` or absent.
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
    """

    def __init__(
        self,
        model: Any,
        task: Any,
        config: TuneConfig | None = None,
        model_name: str | None = None,
        extra_loss: ExtraLoss | None = None,
    ) -> None:
        self.config = config or TuneConfig()
        if not isinstance(self.config, TuneConfig):
            raise TypeError(f"config must be a TuneConfig, got {type(self.config).__name__}")
        _check_task(task)
        self.model = model
        self.task = task
        self.graph = Graph.from_model(model)
        for name in ("top_n", "top_n_start"):
            value = getattr(self.config, name)
            if value is not None and value > self.graph.n_edges:
                raise ValueError(
                    f"{name}={value} is larger than the model's graph ({self.graph.n_edges} "
                    f"valid edges); choose at most {self.graph.n_edges}"
                )
        n_train = task.train_tokens.shape[0]
        self.world = World.current()
        if self.config.batch_size < self.world.size:
            raise ValueError(
                f"batch_size={self.config.batch_size} is smaller than the number of ranks "
                f"({self.world.size}); every rank needs at least one row"
            )
        if n_train < 1:
            raise ValueError("the task has no training rows")
        vocab = model.cfg.d_vocab
        if int(task.train_tokens.max()) >= vocab or int(task.train_tokens.min()) < 0:
            raise ValueError(f"train_tokens hold ids outside the model's vocabulary of {vocab}")
        self.model_name = model_name or getattr(model.cfg, "model_name", None) or "external"
        self.task_name = str(getattr(task, "name", "custom"))
        self.target_eval = getattr(task, "target_eval", None) or next(iter(task.evals))
        self.train_data: TaskData | None = getattr(task, "train_data", None)
        self.extra_loss = extra_loss
        # run state (set by run())
        self.step = 0
        self.circuit: Circuit | None = None
        self.ema: torch.Tensor | None = None
        self.means: torch.Tensor | None = None
        self.last_loss: float | None = None
        self._restriction: contextlib.ExitStack | None = None
        self._rules: list[Any] = []
        self._lora: Any = None

    # ------------------------------------------------------------------ public API

    def run(self, out_dir: str | Path, overwrite: bool = False) -> RunResult:
        """Run (or resume) the tuning in ``out_dir``; returns the last evaluation.

        An ``out_dir`` holding this run resumes from its newest checkpoint; one holding a
        different run (other model, task or config) is refused unless ``overwrite``, which
        removes only what a run owns (``docs/run-format.md``).
        """
        cfg = self.config
        rd = RunDir(Path(out_dir))
        start_step, wall_offset = self._prepare(rd, overwrite)
        optimizer, params = self._optimizer()
        self._optimizer_ref = optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_factor)
        initial = self._initial_snapshot(rd)
        if start_step > 0:
            self._load_checkpoint(rd, start_step, optimizer, scheduler)
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
        try:
            if start_step == 0 and 0 not in done:
                last = self._evaluate_on_main(rd, 0, initial, started, bar)
            for t in range(start_step, cfg.steps):
                self.step = t
                self._train_step(t, optimizer, scheduler, params)
                s = t + 1
                bar.update(1)
                if s % cfg.eval_every == 0 or s == cfg.steps:
                    last = self._evaluate_on_main(rd, s, initial, started, bar)
                if s % cfg.save_every == 0 or s == cfg.steps:
                    save = functools.partial(
                        self._save_checkpoint, rd, s, optimizer, scheduler, started
                    )
                    self.world.on_main(f"saving the checkpoint of step {s}", save)
            model_dir = self.world.on_main("exporting the model", lambda: self._export(rd))
        finally:
            bar.close()
            self._release()
        if not last and self.world.is_main:
            records = rd.read_metrics()
            last = records[-1] if records else {}
        return RunResult(rd.root, last, model_dir)

    def time_steps(self, n_steps: int, warmup: int = 2) -> list[float]:
        """Seconds per optimizer step for ``n_steps`` steps after ``warmup`` untimed ones.

        Trains the model in memory (no run directory, no evaluation): a benchmark helper.
        """
        optimizer, params = self._optimizer()
        self._optimizer_ref = optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.config.lr_factor)
        times = []
        try:
            for t in range(warmup + n_steps):
                start = time.perf_counter()
                self._train_step(t, optimizer, scheduler, params)
                if t >= warmup:
                    times.append(time.perf_counter() - start)
        finally:
            self._release()
        return times

    def batch_scores(self, step: int = 0) -> EdgeScores:
        """Edge scores of ``"batch"`` discovery on step ``step``'s training batch (no update).

        Summed across ranks under ``torch.distributed``: equal to the single-process scores
        of the concatenated global batch.
        """
        local = self._local_rows(step)
        tokens = self.task.train_tokens[local]
        with _eval(self.model):
            logits, record = self._forward(tokens, record=True)
            loss, metric_sum = self._loss(logits, local)
            scores, _ = self._scores_from(record, local, loss, metric_sum, False)
        return EdgeScores(scores, self.graph, {"method": "eap", "ablation": "mean",
                                               "discovery": "batch", "step": step})

    # ------------------------------------------------------------------ set-up

    def _prepare(self, rd: RunDir, overwrite: bool) -> tuple[int, float]:
        """Check or create the run directory; return ``(start_step, wall_time_so_far)``.

        Rank 0 does the file work; an error there stops every rank (``World.on_main``).
        """
        prepared = self.world.on_main(
            "preparing the run directory", lambda: self._prepare_files(rd, overwrite)
        )
        start, wall = prepared if prepared is not None else (0, 0.0)
        start = self.world.broadcast_int(start)
        if self.world.active and start == 0 and not self.world.is_main:
            W.load_weights(self.model, rd.initial_weights)
        return start, wall

    def _prepare_files(self, rd: RunDir, overwrite: bool) -> tuple[int, float]:
        """Rank 0's part of :meth:`_prepare`: refuse, create, clear or resume ``rd``."""
        doc = self._run_doc()
        start, wall = 0, 0.0
        existing = None
        try:
            existing = rd.read_run()
        except RunConflictError:
            if not overwrite:
                raise
        if existing is not None and not self._same_run(existing, doc):
            if not overwrite:
                raise RunConflictError(
                    f"{rd.root} holds a different run ({_diff(existing, doc)}); choose "
                    "another output directory or pass overwrite=True (--overwrite) to "
                    "replace it"
                )
            rd.clear()
            existing = None
        if existing is None:
            foreign = rd.foreign_entries()
            if foreign and not overwrite:
                raise RunConflictError(
                    f"{rd.root} is not empty and holds no ctlens run ({foreign[:3]}); "
                    "choose an empty or new directory, or pass overwrite=True"
                )
            if overwrite:
                rd.clear()
            rd.root.mkdir(parents=True, exist_ok=True)
            rd.clean_temporaries()
            rd.checkpoints.mkdir(exist_ok=True)
            W.save_weights(self.model, tmp := rd.checkpoints / ".initial.tmp.safetensors")
            tmp.replace(rd.initial_weights)
            rd.write_run(doc)
        else:
            rd.clean_temporaries()
            steps = rd.checkpoint_steps()
            start = steps[-1] if steps else 0
            if start > self.config.steps:
                raise RunConflictError(
                    f"{rd.root} has a checkpoint past steps={self.config.steps}"
                )
            if start == 0:
                # killed before the first checkpoint: restart from the saved start weights
                W.load_weights(self.model, rd.initial_weights)
                if rd.metrics.exists():
                    rd.truncate_metrics(-1)
            else:
                # refuse a checkpoint of another model before touching anything
                W.check_weights(self.model, rd.checkpoint_dir(start) / F.WEIGHTS)
                rd.truncate_metrics(start)
                wall = float(load_torch(rd.checkpoint_dir(start) / F.STATE)["wall_time"])
        rd.circuits.mkdir(parents=True, exist_ok=True)
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
            "world_size": self.world.size,
        }

    def _same_run(self, old: dict[str, Any], new: dict[str, Any]) -> bool:
        if old.get("model") != new["model"] or old.get("task") != new["task"]:
            return False
        if old.get("graph") != new["graph"]:
            return False
        try:
            old_cfg = TuneConfig.from_dict(old.get("config", {}))
        except (TypeError, ValueError):
            return False
        return old_cfg.semantic_dict() == self.config.semantic_dict()

    def _optimizer(self) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
        cfg = self.config
        if cfg.mode == "lora":
            from ctlens.tuning.lora import LoraBackend

            self._lora = LoraBackend(self.model, cfg.lora_rank, cfg.lora_alpha)
            params = self._lora.parameters()
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        return optimizer, params

    def _initial_snapshot(self, rd: RunDir) -> list[torch.Tensor]:
        """Real parameters at the start of the run (read from the run directory)."""
        current = W.unique_state_dict(self.model)
        saved = {k: v.clone() for k, v in current.items()}
        try:
            W.load_weights(self.model, rd.initial_weights)
            return W.snapshot(self.model)
        finally:
            with torch.no_grad():
                for k, v in current.items():
                    v.copy_(saved[k])

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

    # ------------------------------------------------------------------ one step

    def _train_step(
        self,
        t: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        params: list[torch.nn.Parameter],
    ) -> None:
        """One optimizer step, with discovery first when ``t % every_k == 0``.

        On a discovery step the previous restriction is lifted before the forward (so every
        parameter is in the autograd graph), the new circuit's restriction is entered after
        the backward and applied to the gradients explicitly (`_mask_grads`); between
        discoveries the restriction's gradient hooks do it.
        """
        cfg = self.config
        local = self._local_rows(t)
        tokens = self.task.train_tokens[local]
        discover = cfg.uses_circuit and t % cfg.every_k == 0
        record = False
        if discover:
            self._release()
            if cfg.mode == "random":
                self._set_circuit(self._random_circuit(t))
            elif cfg.discovery == "task":
                self._set_circuit(self._select(self._task_scores(t), t))
                if cfg.mode in ("forward", "both"):
                    self.means = self._train_means(t)
            elif cfg.mode in ("forward", "both"):
                # the circuit (and its means) must be known before the masked forward
                self._set_circuit(self._select(self.batch_scores(t).scores, t))
            else:
                record = True
        optimizer.zero_grad(set_to_none=True)
        with _eval(self.model), self._forward_mask():
            if self._lora is not None:
                logits, rec = self._lora.logits(tokens), None
            else:
                logits, rec = self._forward(tokens, record=record)
            loss, metric_sum = self._loss(logits, local)
            if record:
                scores, backward_done = self._scores_from(rec, local, loss, metric_sum, True)
                if not backward_done:
                    loss.backward()
                self._set_circuit(self._select(scores, t))
                self._mask_grads()
            else:
                loss.backward()
        del logits, rec
        self.last_loss = self.world.sum_scalar(float(loss.detach()))
        if self.world.active:
            for p in params:
                if p.grad is not None:
                    self.world.sum_(p.grad)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()

    def _forward(
        self, tokens: torch.Tensor, record: bool
    ) -> tuple[torch.Tensor, EapKernel | None]:
        """The model's logits; with ``record``, an `EapKernel` holding ``-a_s`` and the inputs."""
        if not record:
            return self.model(tokens), None
        graph = self.graph
        b, p = tokens.shape
        acts = torch.zeros(graph.n_senders, b, p, self.model.cfg.d_model, device=tokens.device)
        scores = torch.zeros(graph.n_senders, graph.n_receivers, device=tokens.device)
        kernel = EapKernel(graph, acts, scores)
        hooks = [*kernel.sender_hooks(self.model, -1.0), *kernel.receiver_hooks(self.model)]
        with torch.enable_grad():
            logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
        return logits, kernel

    def _loss(
        self, logits: torch.Tensor, local: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training loss (normalised by global counts) and the batch's summed task metric."""
        task, cfg = self.task, self.config
        tokens = task.train_tokens[local].to(logits.device)
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

    def _scores_from(
        self,
        kernel: EapKernel,
        local: torch.Tensor,
        loss: torch.Tensor,
        metric_sum: torch.Tensor | None,
        training: bool,
    ) -> tuple[torch.Tensor, bool]:
        """Batch-discovery edge scores from a recorded forward (`EapKernel`).

        Returns the scores and whether ``loss.backward()`` already ran (with
        ``batch_metric="loss"`` in ``training``, the loss's backward is the metric's).

        Score ``(mean - a_s) . dM/dx_r``, summed over positions, averaged over the global
        batch; ``M`` is the task metric (or ``-loss``). The mean is per position over the
        global batch's real tokens.
        """
        n_rows = self.world.sum_scalar(float(len(local)))
        use_loss = self.config.batch_metric == "loss" or metric_sum is None
        # the kernel's buffer holds -a_s: complete it to (mean - a_s), padding zeroed
        neg_acts = kernel.delta
        mask = self.task.train_attention_mask[local].to(neg_acts.device).float()
        total = -torch.einsum("nbpd,bp->npd", neg_acts, mask)
        count = mask.sum(0)
        self.world.sum_(total)
        self.world.sum_(count)
        means = total / count.clamp(min=1)[None, :, None]
        self.means = means
        neg_acts += means[:, None]
        neg_acts *= mask[None, :, :, None]
        try:
            if use_loss:
                kernel.sign = -1.0
                if training:
                    loss.backward()
                else:
                    torch.autograd.grad(loss, kernel.inputs, allow_unused=True)
            else:
                assert metric_sum is not None
                torch.autograd.grad(metric_sum / n_rows, kernel.inputs, retain_graph=training,
                                    allow_unused=True)
        finally:
            kernel.close()
        return self.world.sum_(kernel.scores).cpu(), use_loss and training

    def _task_scores(self, t: int) -> torch.Tensor:
        """``"task"`` discovery: mean scores over batches of the discovery pairs."""
        cfg = self.config
        data = self.task.discovery
        n = len(data)
        want = min(n, cfg.batch_size * cfg.discovery_batches)
        start = (t // cfg.every_k) * want % n
        rows = (torch.arange(want) + start) % n
        chosen = data[rows]
        reference = None
        if cfg.discovery_ablation == "mean":
            reference = mean_activations(self.model, chosen, batch_size=cfg.batch_size)
        local = self.world.shard(torch.arange(want))
        result = attribute(
            self.model, chosen[local], ablation=cfg.discovery_ablation, reference=reference,
            batch_size=cfg.batch_size, progress=False,
        )
        scores = result.scores * (len(local) / want)
        return self.world.sum_(scores)

    def _select(self, scores: torch.Tensor, t: int) -> Circuit:
        cfg = self.config
        scores = scores.detach().float().cpu()
        if cfg.ema > 0:
            self.ema = scores if self.ema is None else cfg.ema * self.ema + (1 - cfg.ema) * scores
            scores = self.ema
        n = cfg.top_n_at(t)
        circuit = Circuit.from_scores(EdgeScores(scores, self.graph, {}), top_n=n)
        circuit.metadata = {"step": t, "top_n": n, "mode": cfg.mode, "discovery": cfg.discovery}
        circuit.model_name = self.model_name
        return circuit

    def _random_circuit(self, t: int) -> Circuit:
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * (t + 1))
        noise = torch.rand(self.graph.n_senders, self.graph.n_receivers, generator=gen)
        n = self.config.top_n_at(t)
        circuit = Circuit.from_scores(EdgeScores(noise, self.graph, {}), top_n=n)
        return Circuit(self.graph, circuit.mask, None,
                       {"step": t, "top_n": n, "mode": "random"}, self.model_name)

    # ------------------------------------------------------------------ enforcement

    def _set_circuit(self, circuit: Circuit) -> None:
        """Make ``circuit`` the one in force; gradient modes enter its restriction."""
        self.circuit = circuit
        self._release()
        if self.config.mode in ("gradient", "both", "random"):
            from ctlens.masking import restrict_gradients

            stack = contextlib.ExitStack()
            self._rules = stack.enter_context(restrict_gradients(
                self.model, circuit, optimizer=self._optimizer_ref,
                train_embeddings=self.config.train_embeddings,
                train_unembedding=self.config.train_unembedding,
            )).rules
            self._restriction = stack

    def _mask_grads(self) -> None:
        """Apply the restriction to gradients computed before it was entered."""
        if self._restriction is None:
            return
        for rule in self._rules:
            p, keep = rule.parameter, rule.trainable
            if p.grad is None:
                continue
            if not bool(keep.any()):
                p.grad = None
            elif not bool(keep.all()):
                p.grad.mul_(keep.to(p.grad.dtype))

    def _forward_mask(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.mode not in ("forward", "both") or self.circuit is None:
            return contextlib.nullcontext()
        from ctlens.masking import edge_mask

        return edge_mask(self.model, self.circuit, ablation="mean", reference=self.means)

    def _train_means(self, t: int) -> torch.Tensor:
        """Per-position mean sender outputs over step ``t``'s global batch (forward modes)."""
        rows = self._global_rows(t)
        data = TaskData(clean=self.task.train_tokens[rows],
                        attention_mask=self.task.train_attention_mask[rows], metric="kl")
        return mean_activations(self.model, data, batch_size=self.config.batch_size)

    def _release(self) -> None:
        if self._restriction is not None:
            self._restriction.close()
            self._restriction = None
            self._rules = []

    _optimizer_ref: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ evaluation

    def _evaluate_on_main(
        self, rd: RunDir, step: int, initial: list[torch.Tensor], started: float, bar: Any
    ) -> dict[str, Any]:
        """:meth:`_evaluate` on rank 0 (an empty dict elsewhere); its errors stop every rank."""
        record = self.world.on_main(
            f"evaluating step {step}", lambda: self._evaluate(rd, step, initial, started, bar)
        )
        return record if record is not None else {}

    @torch.no_grad()
    def _evaluate(
        self, rd: RunDir, step: int, initial: list[torch.Tensor], started: float, bar: Any
    ) -> dict[str, Any]:
        """Evaluate the current weights, save a circuit snapshot, append to metrics.jsonl."""
        cfg = self.config
        if self._lora is not None:
            self._lora.mirror()
        with _eval(self.model):
            evals, accuracy = {}, {}
            for name, data in self.task.evals.items():
                evals[name], accuracy[name] = self._metric_mean(data)
            target = evals.pop(self.target_eval)
            target_accuracy = accuracy.pop(self.target_eval)
            general = self._general_loss()
            masked = self._masked_target()
        circuit = self.circuit if self.circuit is not None else self._monitor_circuit(step)
        record: dict[str, Any] = {
            "step": step,
            "target_metric": target,
            "general_loss": general,
            "circuit_edges": circuit.n_edges if cfg.uses_circuit else self.graph.n_edges,
            "params_moved": W.moved_fraction(self.model, initial),
            "evals": evals,
            "wall_time": time.perf_counter() - started,
            "lr": cfg.lr * cfg.lr_factor(max(step - 1, 0)),
            "top_n": cfg.top_n_at(max(step - 1, 0)),
            "trainable_fraction": self._trainable_fraction(),
        }
        if target_accuracy is not None:
            record["target_accuracy"] = target_accuracy
        known = {k: v for k, v in accuracy.items() if v is not None}
        if known:
            record["evals_accuracy"] = known
        if masked is not None:
            record["target_metric_masked"] = masked
        if self.last_loss is not None and step > 0:
            record["train_loss"] = self.last_loss
        if circuit is not None:
            path = rd.circuit_file(step)
            circuit.save(path)
            record["circuit_file"] = str(path.relative_to(rd.root))
            record["circuit_source"] = "in_force" if self.circuit is not None else "monitor"
        rd.append_metrics(record)
        bar.set_postfix(target=f"{target:.3f}", general=f"{general:.3f}")
        return record

    def _monitor_circuit(self, step: int) -> Circuit:
        """The task circuit of the current weights (for snapshots outside circuit modes)."""
        cfg = self.config
        data = self.task.discovery
        if cfg.eval_examples is not None:
            data = data[: cfg.eval_examples]
        ablation = cfg.discovery_ablation
        scores = attribute(self.model, data, ablation=ablation, batch_size=cfg.batch_size,
                           progress=False)
        n = cfg.top_n_at(0) if step == 0 else cfg.top_n_at(step - 1)
        circuit = Circuit.from_scores(scores, top_n=n)
        circuit.metadata = {"step": step, "top_n": n, "mode": cfg.mode, "discovery": "monitor"}
        circuit.model_name = self.model_name
        return circuit

    def _metric_mean(self, data: TaskData) -> tuple[float, float | None]:
        """Mean metric over an evaluation set and, for difference metrics, the fraction > 0."""
        if self.config.eval_examples is not None:
            data = data[: self.config.eval_examples]
        values = []
        for batch in data.batches(max(32, self.config.batch_size)):
            batch = batch.trimmed()
            logits = self.model(batch.clean)
            values.append(batch.metric_values(logits, logits).float().cpu())
        v = torch.cat(values)
        accuracy = float((v > 0).float().mean()) if data.metric in ("logit_diff", "prob_diff") \
            else None
        return float(v.mean()), accuracy

    def _masked_target(self) -> float | None:
        """Forward modes: the target metric with the circuit enforced (means: the eval set)."""
        if self.config.mode not in ("forward", "both") or self.circuit is None:
            return None
        from ctlens.masking import edge_mask

        data = self.task.evals[self.target_eval]
        if self.config.eval_examples is not None:
            data = data[: self.config.eval_examples]
        with edge_mask(self.model, self.circuit, ablation="mean", reference=data):
            return self._metric_mean(data)[0]

    def _trainable_fraction(self) -> float:
        """Fraction of real parameters the optimizer may change under the current setting."""
        total = W.count_real_parameters(self.model)
        if self._lora is not None:
            return sum(p.numel() for p in self._lora.parameters()) / total
        if self._restriction is not None and self._rules:
            return sum(r.n_trainable for r in self._rules) / total
        return 1.0

    def _general_loss(self) -> float:
        tokens = getattr(self.task, "general_tokens", None)
        if tokens is None:
            return float("nan")
        mask = getattr(self.task, "general_attention_mask", None)
        if mask is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        if self.config.eval_examples is not None:
            tokens, mask = tokens[: self.config.eval_examples], mask[: self.config.eval_examples]
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

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(
        self, rd: RunDir, step: int, optimizer: torch.optim.Optimizer, scheduler: Any,
        started: float,
    ) -> None:
        """Write checkpoint ``step`` atomically (rank 0 only, through ``World.on_main``)."""
        tmp = rd.new_checkpoint_tmp()
        W.save_weights(self.model, tmp / F.WEIGHTS)
        state: dict[str, Any] = {
            "step": step,
            "wall_time": time.perf_counter() - started,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "ema": self.ema,
            "means": self.means,
            "last_loss": self.last_loss,
            "circuit_mask": None if self.circuit is None else self.circuit.mask,
            "circuit_scores": None if self.circuit is None else self.circuit.scores,
            "circuit_metadata": None if self.circuit is None else _json_str(self.circuit.metadata),
            "lora": None if self._lora is None else self._lora.adapter_state(),
            "config": _json_str(self.config.to_dict()),
        }
        if self.circuit is not None:
            self.circuit.save(tmp / F.CIRCUIT)
        save_torch(state, tmp / F.STATE)
        rd.commit_checkpoint(tmp, step, self.config.keep_checkpoints)

    def _export(self, rd: RunDir) -> Path | None:
        """Export the tuned model as a plain HF directory when ``config.export``."""
        if not self.config.export:
            return None
        if self._lora is not None:
            self._lora.mirror()
        return W.export_hf(self.model, rd.model)

    def _load_checkpoint(
        self, rd: RunDir, step: int, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> None:
        path = rd.checkpoint_dir(step)
        W.load_weights(self.model, path / F.WEIGHTS)
        state = load_torch(path / F.STATE)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.ema = state["ema"]
        self.means = state["means"]
        self.last_loss = state["last_loss"]
        if self._lora is not None and state["lora"] is not None:
            self._lora.load_adapter_state(state["lora"])
        if state["circuit_mask"] is not None:
            import json

            circuit = Circuit(self.graph, state["circuit_mask"], state["circuit_scores"],
                              json.loads(state["circuit_metadata"]), self.model_name)
            self._set_circuit(circuit)
        self.step = step


@contextlib.contextmanager
def _eval(model: Any) -> Any:
    """`ctlens.hooks.eval_mode`, skipped when the model is already in eval mode.

    Switching a bridge's mode walks hundreds of hook modules; the tuner would pay that twice
    per step for nothing (`load_model` returns models in eval mode).
    """
    if not model.training:
        yield
        return
    with eval_mode(model):
        yield


def _json_str(data: Any) -> str:
    import json

    return json.dumps(data)


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short description of how two run descriptions differ."""
    parts = []
    for key in ("model", "task", "graph"):
        if old.get(key) != new.get(key):
            parts.append(f"{key}: {old.get(key)!r} vs {new.get(key)!r}")
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key) and key not in ("progress", "keep_checkpoints"):
            parts.append(f"{key}: {old_cfg.get(key)!r} vs {new_cfg.get(key)!r}")
    return "; ".join(parts[:4]) or "unreadable config"


def _check_task(task: Any) -> None:
    missing = [name for name in ("discovery", "train_tokens", "train_target_mask",
                                 "train_attention_mask", "evals") if not hasattr(task, name)]
    if missing:
        raise TypeError(
            f"the task lacks {missing}; pass a ctlens.tasks.Task or an object with the "
            "fields of ctlens.tuning.TuneTask"
        )
    shape = task.train_tokens.shape
    for name in ("train_target_mask", "train_attention_mask"):
        if getattr(task, name).shape != shape:
            raise ValueError(f"task.{name} must have the shape of train_tokens {tuple(shape)}")
    if not task.evals:
        raise ValueError("the task has no evaluation sets (task.evals is empty)")
    target = getattr(task, "target_eval", None)
    if target is not None and target not in task.evals:
        raise ValueError(f"task.target_eval {target!r} is not one of {list(task.evals)}")
    if int(task.train_target_mask[:, 1:].sum()) == 0:
        raise ValueError("task.train_target_mask selects no target tokens (column 0 never counts)")
