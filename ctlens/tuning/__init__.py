"""Circuit-tuning: fine-tune a model only inside its task circuit (arXiv 2502.06106).

- `TuneConfig` (`ctlens.tuning.config`): every knob of a run, frozen and validated.
- `CircuitTuner` (`ctlens.tuning.runner`): the loop -- rediscover every K steps, select top-N,
  enforce (gradient / forward / both; baselines full / random / lora), evaluate, checkpoint
  atomically, resume exactly; data parallel under ``torch.distributed``. Its parts:
  `ctlens.tuning.discovery` (scores, EMA, selection), `ctlens.tuning.enforcement` (the
  circuit in force, restriction, masks, optimizer), `ctlens.tuning.evaluation` (metrics
  records), `ctlens.tuning.checkpoints` (prepare / resume protocol, checkpoints, export) over
  `ctlens.tuning.rundir` (the layout and file operations), and `ctlens.tuning.parallel`
  (the strategy for one process, data parallelism or FSDP sharding).
- `ctlens.tuning.weights`: the bridge's weights under HF names, parameter counting (shared
  storage once), checkpoint weights and the plain HF export (`export_hf`).

The ``ctlens tune`` command is `ctlens.cli.tune`.

Run directories follow ``docs/run-format.md`` (format version 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctlens._lazy import lazy_exports

if TYPE_CHECKING:  # what the lazy table serves, for type checkers and the API docs
    from ctlens.tuning.checkpoints import RunDirWarning
    from ctlens.tuning.config import TuneConfig
    from ctlens.tuning.distributed import RankFailedError
    from ctlens.tuning.rundir import RunConflictError, RunWriteError
    from ctlens.tuning.runner import CircuitTuner, RunResult, TuneTask
    from ctlens.tuning.weights import CheckpointMismatchError, count_real_parameters, export_hf

# Lazy (ctlens._lazy), so that ``ctlens tune --help`` reads TuneConfig without loading torch.
__getattr__, __dir__ = lazy_exports(__name__, {
    "CheckpointMismatchError": "ctlens.tuning.weights",
    "CircuitTuner": "ctlens.tuning.runner",
    "RankFailedError": "ctlens.tuning.distributed",
    "RunConflictError": "ctlens.tuning.rundir",
    "RunDirWarning": "ctlens.tuning.checkpoints",
    "RunResult": "ctlens.tuning.runner",
    "RunWriteError": "ctlens.tuning.rundir",
    "TuneConfig": "ctlens.tuning.config",
    "TuneTask": "ctlens.tuning.runner",
    "count_real_parameters": "ctlens.tuning.weights",
    "export_hf": "ctlens.tuning.weights",
})

__all__ = [
    "CheckpointMismatchError",
    "CircuitTuner",
    "RankFailedError",
    "RunConflictError",
    "RunDirWarning",
    "RunResult",
    "RunWriteError",
    "TuneConfig",
    "TuneTask",
    "count_real_parameters",
    "export_hf",
]
