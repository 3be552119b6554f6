"""Circuit-tuning: fine-tune a model only inside its task circuit (arXiv 2502.06106).

- `TuneConfig` (`ctlens.tuning.config`): every knob of a run, frozen and validated.
- `CircuitTuner` (`ctlens.tuning.runner`): the loop -- rediscover every K steps, select top-N,
  enforce (gradient / forward / both; baselines full / random / lora), evaluate, checkpoint
  atomically, resume exactly; data parallel under ``torch.distributed``. Its parts:
  `ctlens.tuning.discovery` (scores, EMA, selection), `ctlens.tuning.enforcement` (the
  circuit in force, restriction, masks, optimizer), `ctlens.tuning.evaluation` (metrics
  records), `ctlens.tuning.checkpoints` (prepare / resume protocol, checkpoints, export) over
  `ctlens.tuning.rundir` (the layout and file operations).
- `ctlens.tuning.weights`: the bridge's weights under HF names, parameter counting (shared
  storage once), checkpoint weights and the plain HF export (`export_hf`).
- `ctlens.tuning.cli.add_tune_commands`: the ``ctlens tune`` command.

Run directories follow ``docs/run-format.md`` (format version 1).
"""

from ctlens.tuning.checkpoints import RunDirWarning
from ctlens.tuning.config import TuneConfig
from ctlens.tuning.distributed import RankFailedError
from ctlens.tuning.rundir import RunConflictError, RunWriteError
from ctlens.tuning.runner import CircuitTuner, RunResult, TuneTask
from ctlens.tuning.weights import CheckpointMismatchError, count_real_parameters, export_hf

__all__ = [
    "CheckpointMismatchError",
    "CircuitTuner",
    "RankFailedError",
    "RunConflictError",
    "RunDirWarning",
    "RunResult",
    "TuneConfig",
    "TuneTask",
    "RunWriteError",
    "count_real_parameters",
    "export_hf",
]
