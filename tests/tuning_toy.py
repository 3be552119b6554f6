"""A small hand-built task for the tuning tests, and a subprocess entry point.

``python tests/tuning_toy.py '<json>'`` runs one `CircuitTuner` on the tiny GPT-2 with the
toy task (used by the SIGKILL and data-parallel tests). JSON keys: ``out`` (run directory),
``config`` (TuneConfig fields), ``threads`` (torch threads, default 1), ``family``,
``spans`` (true: the toy task with spans, `spanned_toy_task`), and
``hold`` (``{"step", "until"}``: before that training step the tuner waits until the file
``until`` exists, so a test can act while a run is certainly in progress), and
with ``ddp`` optionally ``fail`` (``{"rank", "step"}``: that rank raises at that step) and
``forbid_gather`` (true: `Sharding.gathered` and `Sharding.optimizer_state` raise).

The tests start such processes with `launch` (one) or `launch_ranks` (gloo ranks on a free
port) and wait for them with `finish_all`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import VOCAB, random_task, tiny_gpt2_module, tiny_llama_module  # noqa: E402

import ctlens  # noqa: E402


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict) -> subprocess.Popen:
    """Run this file on ``spec`` in a new process (one thread, fixed hash seed), output
    captured."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def launch_ranks(spec: dict, world: int, dump: Path) -> list[subprocess.Popen]:
    """``world`` gloo ranks of ``spec`` rendezvousing on a free port, dumping to ``dump``."""
    port = free_port()
    return [launch({**spec, "ddp": {"rank": r, "world": world, "port": port,
                                    "dump": str(dump)}}) for r in range(world)]


def finish_all(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Wait for every process; if any failed (an error, a signal, a timeout), fail with the
    output of *every* rank: the first error is often on a rank other than 0."""
    outputs = []
    for proc in procs:
        try:
            out = proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0] + f"\n[killed after {timeout} s]".encode()
        outputs.append(out.decode(errors="replace"))
    if any(proc.returncode != 0 for proc in procs):
        raise AssertionError("\n".join(
            f"----- rank {r}: exit {proc.returncode} -----\n{out[-3000:]}"
            for r, (proc, out) in enumerate(zip(procs, outputs, strict=True))))


@dataclass(frozen=True)
class ToyTask:
    """Any object with these fields works with `CircuitTuner` (the `TuneTask` protocol)."""

    discovery: ctlens.TaskData
    train_tokens: torch.Tensor
    train_target_mask: torch.Tensor
    train_attention_mask: torch.Tensor
    train_data: ctlens.TaskData
    evals: Mapping[str, ctlens.TaskData]
    target_eval: str
    general_tokens: torch.Tensor | None = None
    general_attention_mask: torch.Tensor | None = None
    name: str = "toy"


def toy_task(n: int = 24, seq: int = 8, seed: int = 3) -> ToyTask:
    """Right-padded random rows whose last real token is the training target."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, seq), generator=gen)
    lengths = torch.randint(seq - 2, seq + 1, (n,), generator=gen)
    attention = torch.arange(seq)[None] < lengths[:, None]
    tokens[~attention] = 0
    target = torch.zeros_like(attention)
    target[torch.arange(n), lengths - 1] = True
    correct = tokens[torch.arange(n), lengths - 1]
    wrong = correct % (VOCAB - 1) + 1
    train = ctlens.TaskData(clean=tokens, correct=correct, wrong=wrong, positions=lengths - 2,
                            attention_mask=attention)
    return ToyTask(
        discovery=random_task(12, 7, seed=seed),
        train_tokens=tokens,
        train_target_mask=target,
        train_attention_mask=attention,
        train_data=train,
        evals={"toy": train[:8], "other": random_task(6, 7, seed=9)},
        target_eval="toy",
        general_tokens=torch.randint(1, VOCAB, (4, 12), generator=gen),
    )


SPAN_NAMES = ("early", "middle", "late")
"""The spans of `spanned_toy_task` (positional runs)."""


def spanned(data: ctlens.TaskData, seed: int) -> ctlens.TaskData:
    """``data`` with random span labels over `SPAN_NAMES` (every span used)."""
    from dataclasses import replace

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SPAN_NAMES), data.clean.shape, generator=gen)
    labels[0, : len(SPAN_NAMES)] = torch.arange(len(SPAN_NAMES))
    return replace(data, spans=labels, span_names=SPAN_NAMES)


def spanned_toy_task() -> ToyTask:
    """`toy_task` with spans on its discovery pairs, training rows and target set."""
    from dataclasses import replace

    task = toy_task()
    train = spanned(task.train_data, seed=1)
    return replace(task, discovery=spanned(task.discovery, seed=2), train_data=train,
                   evals={"toy": train[:8], "other": task.evals["other"]})


def tiny_model(family: str = "gpt2", seed: int = 0):
    build = tiny_gpt2_module if family == "gpt2" else tiny_llama_module
    return ctlens.load_model(build(seed=seed))


def main(spec: dict) -> None:
    """Run one tuner; with ``ddp`` ({"rank", "world", "port", "dump"}) as one gloo rank.

    A DDP rank first writes its all-reduced batch scores of step 0 and, after the run, its
    weights (when sharded: none, but the bytes of its parameter shards) to
    ``dump/rank{r}.pt``.
    """
    torch.set_num_threads(int(spec.get("threads", 1)))
    model = tiny_model(spec.get("family", "gpt2"))
    config = ctlens.TuneConfig(**spec["config"])
    ddp = spec.get("ddp")
    make_task = spanned_toy_task if spec.get("spans") else toy_task
    if ddp is None:
        tuner = ctlens.CircuitTuner(model, make_task(), config)
        if "hold" in spec:
            _hold_at(tuner, spec["hold"]["step"], Path(spec["hold"]["until"]))
        tuner.run(spec["out"])
        return
    import torch.distributed as dist

    from ctlens.tuning import weights

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ddp['port']}",
                            rank=ddp["rank"], world_size=ddp["world"])
    try:
        tuner = ctlens.CircuitTuner(model, make_task(), config)
        fail = spec.get("fail")  # {"rank", "step"}: that rank raises at that training step
        if fail is not None and fail["rank"] == ddp["rank"]:
            _fail_at(tuner, fail["step"])
        if spec.get("forbid_gather"):
            _forbid_gather()
        scores = tuner.batch_scores(0).scores
        tuner.run(spec["out"])
        # a sharded model's weights are read from its run directory's checkpoint instead
        state = {} if config.shard else {
            k: v.detach().clone() for k, v in weights.unique_state_dict(model).items()
        }
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) \
            if config.shard else None
        torch.save({"scores": scores, "weights": state, "local_bytes": local},
                   Path(ddp["dump"]) / f"rank{ddp['rank']}.pt")
        dist.barrier()  # leave together, as `ctlens tune` does
    finally:
        dist.destroy_process_group()


def _forbid_gather() -> None:
    """Make every way a sharded run gathers whole parameters or optimizer state raise."""
    from ctlens.tuning.parallel.sharding import Sharding

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sharded run gathered the whole model")

    Sharding.gathered = refuse  # type: ignore[method-assign]
    Sharding.optimizer_state = refuse  # type: ignore[method-assign]


def _fail_at(tuner: ctlens.CircuitTuner, step: int) -> None:
    """Make ``tuner`` raise before its training step ``step`` (a rank dying mid-run)."""
    train = tuner._train_step

    def failing(t: int, *args: object) -> None:
        if t == step:
            raise RuntimeError(f"injected failure at step {t}")
        train(t, *args)

    tuner._train_step = failing  # type: ignore[method-assign]


def _hold_at(tuner: ctlens.CircuitTuner, step: int, until: Path) -> None:
    """Make ``tuner`` wait before its training step ``step`` until ``until`` exists."""
    train = tuner._train_step

    def holding(t: int, *args: object) -> None:
        while t == step and not until.exists():
            time.sleep(0.05)
        train(t, *args)

    tuner._train_step = holding  # type: ignore[method-assign]


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
