"""Benchmark: per-rank memory of sharded (FSDP2) against data-parallel (DDP) circuit-tuning.

Each case starts 2 gloo processes on the CPU that run the same `CircuitTuner` (gradient mode,
batch discovery, AdamW, a few steps, one DCP checkpoint for FSDP) on the same model: once
with ``shard="fsdp"`` and once unsharded (every rank holds the whole model: DDP). After the
run each rank reports

- the bytes of the parameters it holds (its local shard under FSDP) and of its optimizer
  state (exp_avg, exp_avg_sq, step; local shards under FSDP), counted from the tensors, and
- its peak resident memory (``VmHWM`` of ``/proc/self/status``, Linux) minus its resident
  memory just before the model was built: weights, gradients, optimizer state, activations
  and the model as built whole before it is sharded all count.

Models: the zoo's ``tiny-llama`` shape and a wider Llama built here (random weights, no
download), where the weights dominate the process's other allocations. Prints a table and,
unless ``--no-report``, writes the "sharding" section of docs/benchmarks.md.

Run: ``python benchmarks/sharding.py [--no-report]``; one rank:
``python benchmarks/sharding.py --rank '<json>'``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHAPES: dict[str, dict[str, int] | None] = {
    "tiny-llama (zoo shape)": None,
    "llama-4x512": {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
                    "num_key_value_heads": 8, "intermediate_size": 1376, "vocab_size": 8000},
}
STEPS = 3


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _model(shape: dict[str, int] | None) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ctlens
    from ctlens.zoo.configs import spec

    if shape is None:
        config = spec("tiny-llama").hf_config()
    else:
        config = LlamaConfig(**shape, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return ctlens.load_model(LlamaForCausalLM(config).eval())


def _task(vocab: int, n: int = 16, seq: int = 24) -> Any:
    import torch

    from ctlens.data import TaskData

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, vocab, (n, seq), generator=gen)
    attention = torch.ones_like(tokens, dtype=torch.bool)
    target = torch.zeros_like(attention)
    target[:, -1] = True
    data = TaskData(clean=tokens, correct=tokens[:, -1], wrong=(tokens[:, -1] % (vocab - 1)) + 1,
                    positions=torch.full((n,), seq - 2), attention_mask=attention)
    return SimpleNamespace(name="bench", discovery=data, train_tokens=tokens,
                           train_target_mask=target, train_attention_mask=attention,
                           train_data=data, evals={"bench": data}, target_eval="bench")


def run_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of one case: tune, then count its bytes and read its peak RSS."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ctlens.tuning import CircuitTuner, TuneConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}",
                            rank=spec["rank"], world_size=2)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    model = _model(spec["shape"])
    config = TuneConfig(mode="gradient", top_n=0.2, steps=STEPS, every_k=1, batch_size=8,
                        eval_every=STEPS, save_every=STEPS, eval_examples=8, export=False,
                        progress=False, shard="fsdp" if spec["fsdp"] else None,
                        checkpoint_format="dcp" if spec["fsdp"] else "safetensors")
    tuner = CircuitTuner(model, _task(model.cfg.d_vocab), config)
    seen: dict[str, Any] = {}
    original = tuner._train_step

    def step(t: int, enforcement: Any, scheduler: Any) -> None:
        original(t, enforcement, scheduler)
        seen["optimizer"] = enforcement.optimizer

    tuner._train_step = step  # type: ignore[method-assign]
    tuner.run(spec["out"])

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    state = seen["optimizer"].state.values()
    optim = sum(local(v).numel() * v.element_size()
                for s in state for v in s.values() if isinstance(v, torch.Tensor))
    peak = (_rss_kib("VmHWM") - before) * 1024
    dist.destroy_process_group()
    return {"params": params, "optimizer": optim, "peak": peak}


def run_case(shape: dict[str, int] | None, fsdp: bool) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--rank", json.dumps(
                {"rank": r, "port": port, "shape": shape, "fsdp": fsdp, "out": f"{tmp}/run"})],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(2)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=1800)
            if proc.returncode:
                raise RuntimeError(err[-3000:])
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", help="run one rank (JSON spec) and print its measurement")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    if args.rank:
        print(json.dumps(run_rank(json.loads(args.rank))))
        return
    mib = 1 / 2**20
    rows = ["| model | mode | params MiB / rank | optimizer MiB / rank | (params+optimizer) "
            "FSDP/DDP | peak RSS MiB / rank | peak FSDP/DDP |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for name, shape in SHAPES.items():
        ddp, fsdp = run_case(shape, False), run_case(shape, True)
        for mode, res in (("DDP", ddp), ("FSDP", fsdp)):
            held = max(r["params"] + r["optimizer"] for r in res) / \
                max(r["params"] + r["optimizer"] for r in ddp)
            peak = max(r["peak"] for r in res) / max(r["peak"] for r in ddp)
            cols = [" / ".join(f"{r[key] * mib:.{digits}f}" for r in res)
                    for key, digits in (("params", 2), ("optimizer", 2), ("peak", 0))]
            rows.append(f"| {name} | {mode} | {cols[0]} | {cols[1]} | {held:.2f} | {cols[2]} | "
                        f"{peak:.2f} |")
        print("\n".join(rows[-2:]), flush=True)
    text = "\n".join(rows)
    print(text)
    if not args.no_report:
        sys.path.insert(0, str(Path(__file__).parent))
        from _report import write_section

        write_section("sharding", SECTION.format(table=text, steps=STEPS,
                                                  conclusion=CONCLUSION))


CONCLUSION = (
    "the peak ratio on llama-4x512 is still about 1 (this table). Which phase sets it was "
    "measured there by resetting `VmHWM` (writing 5 to `/proc/self/clear_refs`) at phase "
    "boundaries, in 4 runs of a script not kept here (MiB above the resident memory before the "
    "build): building the whole model reaches 346 on every rank, and rank 0's step-0 "
    "evaluation on the whole model 590-600 (rank 1 waits at 430-510); once training starts "
    "only the shards are left (the whole parameters are freed). Neither phase sets the peak, so "
    "sharding before the step-0 evaluation would not lower it. Under FSDP the peak comes "
    "later: each discovery step's backward reaches 780-920 and the step-3 evaluation, which "
    "every rank runs over all evaluation rows through the sharded model, 900-970. Under DDP "
    "the peak is rank 0's step-3 evaluation and safetensors checkpoint (920-930; rank 1 stays "
    "below 760, its backward at 720-750). Two things keep FSDP's peak up. Its discovery step's "
    "transient is larger: with `malloc_trim` at every boundary the resident memory rises from "
    "about 490 between steps (DDP: 635, as FSDP holds half the parameters, gradients and "
    "optimizer state) to 790-845 in the backward, 300-350 more, where DDP's rises 90 (to "
    "720-730); the profiler counts, in one step, 3 gathers of every block (36 MB) and 2 of the "
    "root's embeddings and unembedding (62.5 MB). And the C allocator keeps freed memory, "
    "which lifts FSDP's resident memory between steps from about 490 to 850-900. With the "
    "trims FSDP's peak (its backward, 790-845) is 0.95 of DDP's (890)."
)

SECTION = """## Sharded tuning memory (`benchmarks/sharding.py`)

Per-rank memory of `CircuitTuner` on 2 gloo processes (CPU, fp32): `shard="fsdp"` (with
`checkpoint_format="dcp"`) against the same run unsharded (every rank holds the whole
model, as in DDP). Gradient mode, batch discovery, AdamW, {steps} steps, batch 8 x 24
tokens, one evaluation and one checkpoint. "params" and "optimizer" are the bytes of the
tensors each rank holds after the run (its local shards under FSDP); "peak RSS" is each
rank's resident-memory high-water mark (`VmHWM`) minus its resident memory before the model
was built, so it counts activations, gradients, and the whole model each rank builds
before sharding it. Ranks are listed as rank 0 / rank 1.

{table}

Parameters and optimizer state per rank are half under FSDP, as 2 ranks should give. Since
the training step, each rediscovery's trainable masks (built from parameter shapes and cut
to local rows), evaluation (every rank runs the sharded forward, block by block),
`params_moved` (local rows against the start weights' rows read from the run's file) and
DCP checkpoints gather nothing whole, {conclusion}
"""


if __name__ == "__main__":
    main()
