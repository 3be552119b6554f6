"""The parallelism strategies (`ctlens.tuning.parallel`), each on its own checks, in one process.

What a strategy does across real ranks is tested end to end by the multi-process runs
(`test_tuning_processes.py`, `test_sharded_checkpoints.py`, `test_sharded_memory.py`,
`test_torchrun_cli.py`): there they must match one unsharded process. Here: which strategy a
run gets, what each refuses (once, when the tuner is built), and the whole-model defaults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from tuning_toy import tiny_model, toy_task

import ctlens
from ctlens.masking import restrict_gradients
from ctlens.tuning import CircuitTuner, TuneConfig
from ctlens.tuning import weights as W
from ctlens.tuning.distributed import World
from ctlens.tuning.parallel import (
    DataParallel,
    FullySharded,
    HookedRestriction,
    OneProcess,
    parallelism,
    strategy_type,
)
from ctlens.tuning.parallel import sharding as sharding_module


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """An initialised gloo process group of one rank, in this process, for the duration."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _circuit(model: object, top_n: int = 12) -> ctlens.Circuit:
    graph = ctlens.Graph.from_model(model)
    noise = torch.rand(graph.n_senders, graph.n_receivers,
                       generator=torch.Generator().manual_seed(0))
    return ctlens.Circuit.from_scores(ctlens.EdgeScores(noise, graph, {}), top_n=top_n)


def test_each_run_gets_its_strategy() -> None:
    model = tiny_model("llama")
    assert strategy_type(TuneConfig(), World()) is OneProcess
    assert strategy_type(TuneConfig(), World(0, 2)) is DataParallel
    assert strategy_type(TuneConfig(shard="fsdp"), World()) is FullySharded
    assert strategy_type(TuneConfig(shard="fsdp"), World(1, 4)) is FullySharded
    assert type(parallelism(model, TuneConfig(batch_size=4), World(0, 2))) is DataParallel
    tuner = CircuitTuner(model, toy_task(), TuneConfig(top_n=10, steps=1, progress=False))
    assert type(tuner.parallel) is OneProcess


def test_whole_model_defaults() -> None:
    """A model every process holds whole: nothing wraps or gathers, task discovery divides
    its rows among the run's ranks, ``run.json`` records no sharding."""
    model = tiny_model("gpt2")
    for world, kind in ((World(), OneProcess), (World(1, 2), DataParallel)):
        strategy = parallelism(model, TuneConfig(batch_size=4), world)
        assert type(strategy) is kind
        assert strategy.wrap(model) is False
        assert strategy.task_world == world
        assert strategy.run_record(model) == {"world_size": world.size, "sharded": False,
                                              "rank_parameter_bytes": None}
        with strategy.gathered():
            pass
        strategy.check_time_steps()
        saved = {"state": {}, "param_groups": [{"params": [0]}]}
        assert strategy.from_consolidated(saved) is saved


def test_every_strategy_refuses_too_few_rows_and_dcp_on_fused_qkv() -> None:
    with pytest.raises(ValueError, match="batch_size=2 is smaller than the number of ranks"):
        parallelism(tiny_model("llama"), TuneConfig(batch_size=2), World(0, 3))
    with pytest.raises(ValueError, match="checkpoint_format='dcp' does not support models "
                                         "with fused q/k/v"):
        parallelism(tiny_model("gpt2"), TuneConfig(checkpoint_format="dcp"), World())
    assert type(parallelism(tiny_model("llama"), TuneConfig(checkpoint_format="dcp"),
                            World())) is OneProcess


def test_fsdp_refuses_without_a_process_group_before_any_work() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="shard='fsdp' needs torch.distributed initialised"):
        CircuitTuner(tiny_model("llama"), toy_task(), TuneConfig(shard="fsdp", top_n=10, steps=1))


def test_fsdp_checks_shardability_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`check_shardable` runs when the strategy is built and not again when it wraps."""
    calls: list[object] = []
    real = sharding_module.check_shardable

    def counted(model: object) -> None:
        calls.append(model)
        real(model)

    monkeypatch.setattr("ctlens.tuning.parallel.fsdp.check_shardable", counted)
    monkeypatch.setattr(sharding_module, "check_shardable", counted)
    model = tiny_model("llama")
    with one_rank_group():
        strategy = parallelism(model, TuneConfig(shard="fsdp", batch_size=4), World.current())
        assert calls == [model]
        assert strategy.wrap(model) is True
        assert strategy.wrap(model) is False  # already sharded
        assert calls == [model]


@pytest.mark.parametrize(("family", "local"), [("llama", True), ("gpt2", False)])
def test_fsdp_decides_its_paths_on_the_unsharded_model(family: str, local: bool) -> None:
    """No gathering for models without fused q/k/v; GPT-2 gathers. Task discovery scores all
    rows on every rank; ``run.json`` records each rank's share of the real parameters."""
    model = tiny_model(family)
    with one_rank_group():
        strategy = parallelism(model, TuneConfig(shard="fsdp", batch_size=4), World(0, 2))
    assert type(strategy) is FullySharded and strategy.local is local
    assert strategy.task_world == World()
    record = strategy.run_record(model)
    assert (record["world_size"], record["sharded"]) == (2, True)
    assert sum(record["rank_parameter_bytes"]) == W.count_real_parameters(model) * 4
    with pytest.raises(ValueError, match="time_steps does not shard"):
        strategy.check_time_steps()


def test_fsdp_refuses_other_views() -> None:
    """A parameter that is a strided view (other than GPT-2's q/k/v of ``c_attn``) cannot be
    sharded: refused when the strategy is built."""
    model = tiny_model("llama")
    name, weight = next((n, p) for n, p in model.named_parameters() if p.dim() == 2)
    with one_rank_group(), torch.no_grad():
        weight.data = weight.data.t().contiguous().t()  # the same values, strided
        with pytest.raises(ValueError, match=f"non-contiguous views of another tensor "
                                             f"\\({name}, 1 in all\\)"):
            parallelism(model, TuneConfig(shard="fsdp"), World.current())


def test_hooked_restriction_is_restrict_gradients() -> None:
    """The whole-model restriction masks gradients as `restrict_gradients`' rules say and
    reports their trainable share of the real parameters."""
    model = tiny_model("gpt2")
    circuit = _circuit(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with restrict_gradients(model, circuit) as oracle:
        want = {id(r.parameter): r.trainable.clone() for r in oracle.rules}
        fraction = sum(r.n_trainable for r in oracle.rules) / W.count_real_parameters(model)
    tokens = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    model(tokens).sum().backward()  # gradients before the restriction begins
    restriction = HookedRestriction(model, circuit, optimizer, False, False)
    try:
        restriction.mask_grads()
        for rule in restriction.rules:
            if rule.parameter.grad is not None:
                keep = want[id(rule.parameter)]
                assert not rule.parameter.grad[~keep].any(), rule.name
        assert restriction.trainable_fraction() == pytest.approx(fraction)
        assert 0 < restriction.trainable_fraction() < 1
    finally:
        restriction.close()
