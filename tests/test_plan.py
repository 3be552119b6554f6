"""Real model shapes on the meta device, and the memory planner (ctlens.plan)."""

from __future__ import annotations

import pytest
import torch

from ctlens import real_shapes

# Parameter counts of the real checkpoints (tied embeddings counted once).
PUBLISHED = {
    "gpt2": 124_439_808,
    "pythia-160m": 162_322_944,
    "pythia-1b": 1_011_781_632,
    "qwen2.5-0.5b": 494_032_768,
    "gemma-2-2b": 2_614_341_888,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "olmo-2-1b": 1_484_916_736,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_shape_builds_on_meta_with_published_count(name: str) -> None:
    module = real_shapes.build(name)
    assert all(p.device.type == "meta" for p in module.parameters())
    n = real_shapes.count_parameters(module)
    assert n == PUBLISHED[name]
    assert abs(n / real_shapes.shape(name).params - 1) < 0.01


def test_real_shape_lookup() -> None:
    assert real_shapes.names() == list(real_shapes.SHAPES)
    assert set(real_shapes.names()) == set(PUBLISHED)
    assert real_shapes.shape("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert real_shapes.build("gpt2", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="known: gpt2"):
        real_shapes.shape("gpt-5")


# ------------------------------------------------------------------------------ planner

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import ctlens  # noqa: E402
from ctlens.cli.plan import add_plan_command  # noqa: E402
from ctlens.planner import GIB, MemoryBudgetError, model_shape, parse_bytes  # noqa: E402


def test_graph_size_matches_the_graph(tiny_model) -> None:
    graph = ctlens.Graph.from_model(tiny_model)
    assert model_shape(tiny_model).graph_size() == (graph.n_senders, graph.n_receivers)
    # the design's numbers for GPT-2 small
    assert model_shape("gpt2").graph_size() == (157, 445)


def test_shape_of_a_bridge_counts_real_parameters(tiny_model) -> None:
    from ctlens.tuning.weights import count_real_parameters

    shape = model_shape(tiny_model)
    assert shape.n_params == count_real_parameters(tiny_model)
    assert shape.dtype == torch.float64
    assert 0 < shape.attn_params + shape.mlp_params < shape.n_params


def test_plan_parts_follow_the_formulas() -> None:
    p = ctlens.plan("llama-3.1-8b", batch_size=4, seq_len=256, dtype="bfloat16")
    shape = p.shape
    assert shape.bytes_per_param == 2
    assert p.parts["weights"] == 8_030_261_248 * 2
    n_send, _ = shape.graph_size()
    assert p.parts["sender buffer"] == n_send * 4 * 256 * 4096 * 4  # fp32 [S, b, p, d]
    assert p.peak_bytes == sum(p.parts.values())
    # activations and the sender buffer scale with the tokens; the weights do not
    q = ctlens.plan("llama-3.1-8b", batch_size=8, seq_len=256, dtype="bfloat16")
    assert q.parts["weights"] == p.parts["weights"]
    assert q.parts["sender buffer"] == 2 * p.parts["sender buffer"]
    assert q.parts["activations"] == pytest.approx(2 * p.parts["activations"], abs=2)
    share = p.parts["sender buffer"] / p.peak_bytes
    assert any("sender buffer" in note for note in p.notes) == (share > 0.25)
    groups = ctlens.plan("llama-3.1-8b", batch_size=4, seq_len=256, dtype="bfloat16",
                         mlp_groups=4)
    assert groups.parts["sender buffer"] > p.parts["sender buffer"]


def test_plan_counts_one_score_matrix_per_span(tiny_model) -> None:
    """A positional graph's scores are ``[senders, receivers, spans]`` (the tensor
    `ctlens.attribute` returns on it); nothing else in the plan changes."""
    graph = ctlens.Graph.from_model(tiny_model, spans=("subject", "verb", "end"))
    cells = graph.n_senders * graph.n_receivers * graph.n_spans
    assert graph.dense_shape == (graph.n_senders, graph.n_receivers, graph.n_spans)
    for operation, copies in (("attribute", 1), ("tune", 2)):  # a tuning step keeps two
        plain = ctlens.plan(tiny_model, operation=operation, seq_len=8)
        spanned = ctlens.plan(tiny_model, operation=operation, seq_len=8,
                              spans=graph.n_spans)
        assert spanned.parts["scores"] == copies * cells * 4
        assert spanned.parts["scores"] == graph.n_spans * plain.parts["scores"]
        assert {k: v for k, v in spanned.parts.items() if k != "scores"} == {
            k: v for k, v in plain.parts.items() if k != "scores"}
    with pytest.raises(ValueError, match="spans must be a positive integer"):
        ctlens.plan(tiny_model, seq_len=8, spans=0)


def test_tune_plan_and_fsdp_division() -> None:
    single = ctlens.plan("llama-3.2-1b", mode="tune", batch_size=8, seq_len=128)
    for key in ("gradients", "optimizer state", "restriction state", "logits"):
        assert single.parts[key] > 0
    assert single.parts["optimizer state"] == 2 * single.parts["gradients"]
    fsdp = ctlens.plan("llama-3.2-1b", mode="tune", batch_size=8, seq_len=128, ranks=4,
                       shard=True)
    assert fsdp.parts["weights"] == single.parts["weights"] // 4
    assert fsdp.parts["optimizer state"] == single.parts["optimizer state"] // 4
    assert fsdp.parts["fsdp all-gathered layers"] > 0
    assert fsdp.parts["activations"] == pytest.approx(single.parts["activations"] / 4, abs=2)
    ddp = ctlens.plan("llama-3.2-1b", mode="tune", batch_size=8, seq_len=128, ranks=4)
    assert ddp.parts["weights"] == single.parts["weights"]


def test_recommended_batch_is_the_largest_that_fits() -> None:
    p = ctlens.plan("gpt2", mode="tune", seq_len=128, budget="24GiB")
    usable = 24 * GIB * 0.9
    best = p.recommended_batch
    assert best is not None and best >= 1
    assert ctlens.plan("gpt2", mode="tune", seq_len=128, batch_size=best).peak_bytes <= usable
    assert ctlens.plan("gpt2", mode="tune", seq_len=128, batch_size=best + 1).peak_bytes > usable
    sharded = ctlens.plan("gpt2", mode="tune", seq_len=128, budget="24GiB", ranks=4, shard=True)
    assert sharded.recommended_batch % 4 == 0 and sharded.recommended_batch > best


def test_budget_below_the_minimum_is_refused() -> None:
    with pytest.raises(MemoryBudgetError, match=r"needs .* GiB .* of the 40.00 GiB budget"):
        ctlens.plan("llama-3.1-8b", mode="tune", dtype="bfloat16", budget="40GiB")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mode": "train"}, "mode must be one of"), ({"method": "exact"}, "method must be"),
     ({"batch_size": 0}, "batch_size must be a positive"), ({"dtype": "int8"}, "dtype must"),
     ({"budget": "lots"}, "cannot read the memory budget")],
)
def test_plan_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ctlens.plan("gpt2", **kwargs)


def test_parse_bytes() -> None:
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("24 GiB") == 24 * 2**30
    assert parse_bytes(1234) == 1234
    for bad in ("-1GB", "GB", "3 parsecs", 0):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_plan_is_the_function_and_the_cli_module_is_light() -> None:
    from ctlens.planner import plan

    assert ctlens.plan is plan
    source = Path(ctlens.__file__).parent / "cli" / "plan.py"
    body = ast.parse(source.read_text()).body
    top = [n for n in body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert all("torch" not in ast.dump(n) and "ctlens" not in ast.dump(n) for n in top)


def _cli(*args: str) -> int:
    """Run ``ctlens plan ARGS`` in process (as ctlens.cli does: ValueError -> exit 2)."""
    parser = argparse.ArgumentParser(prog="ctlens")
    add_plan_command(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["plan", *args])
    try:
        return parsed.func(parsed)
    except ValueError as err:
        print(f"ctlens plan: error: {err}", file=sys.stderr)
        return 2


def test_plan_cli(capsys: pytest.CaptureFixture) -> None:
    assert _cli("--model", "pythia-1b", "--mode", "tune", "--budget", "80GB", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is not None and doc["recommended_batch"] >= 1
    assert doc["peak_bytes"] == ctlens.plan("pythia-1b", mode="tune").peak_bytes
    assert _cli("--model", "gpt2", "--ranks", "2", "--shard", "fsdp") == 0
    assert "fsdp all-gathered layers" in capsys.readouterr().out
    assert _cli("--model", "llama-3.1-8b", "--mode", "tune", "--budget", "8GB") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs" in err
    assert _cli("--model", "gpt-5") == 2
    assert "known: gpt2" in capsys.readouterr().err


def test_plan_cli_reads_a_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    real_shapes.shape("gpt2").hf_config().save_pretrained(tmp_path)
    assert _cli("--model", str(tmp_path), "--json") == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == ctlens.plan("gpt2").peak_bytes
    assert _cli("--model", str(tmp_path / "missing")) == 2


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("index", [1, 5, 7, 11, 16])  # llama EAP, llama forward, gpt2 tuning
# step, and with MLP neuron groups llama EAP and llama tuning step
def test_planner_within_25_percent_of_measured_cpu_peak(index: int) -> None:
    """The planner's peak against a measured one, on shapes not used to fit it."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "plan.py"
    spec = importlib.util.spec_from_file_location("plan_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    case = bench.VALIDATION[index]
    assert case not in bench.CALIBRATION
    row = bench.compare([bench.run_case(case)])[0]
    assert abs(row["error"]) < 0.25, row


def test_plan_and_delta_commands_are_registered(capsys: pytest.CaptureFixture) -> None:
    from ctlens.cli import main

    assert main(["plan", "--model", "gpt2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_bytes"] == ctlens.plan("gpt2").peak_bytes
    assert main(["plan", "--model", "llama-3.1-8b", "--mode", "tune", "--budget", "1GB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctlens plan: error: llama-3.1-8b needs") and err.count("\n") == 1
    assert main(["apply-delta", "base", "nowhere", "--out", "x"]) == 2
    assert "is not a ctlens delta" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("dtype", "mlp_groups", "regime"),
    [("float32", 128, "receivers"), ("bfloat16", 1, "chunk"), ("float32", 1, "micro"),
     ("bfloat16", 1, "senders"), ("float32", 1, "senders")],
)
def test_attribution_plan_fits_as_attribute_does(dtype: str, mlp_groups: int, regime: str) -> None:
    """With a budget, the plan's attribution buffers are the fit `ctlens.attribute` makes
    with the ``max_memory`` the plan names: same regime, same batch, within the budget."""
    from conftest import tiny_gpt2_module

    from ctlens.memory import SenderLayout, bytes_per_example, fit_attribution

    # 64 positions: the planner refuses rows longer than the model's context, as attribute does
    model = ctlens.load_model(tiny_gpt2_module(dtype=getattr(torch, dtype), n_ctx=64))
    graph = ctlens.Graph.from_model(model, mlp_groups=mlp_groups)
    seq, batch = 64, 8
    runs = {"micro": 3, "senders": 1}.get(regime, batch)  # the batch the fit should run
    free = ctlens.plan(model, batch_size=runs, seq_len=seq, mlp_groups=mlp_groups)
    fixed = free.peak_bytes - free.parts["sender buffer"] - free.parts["receiver gradients"]
    width = max(model.cfg.n_heads, mlp_groups)
    layout = SenderLayout.of(model, graph)

    def per_example(rows: int, item: int, chunk: int | None, queue: int | None) -> int:
        return bytes_per_example(layout, rows, seq, width, item, chunk, queue)

    s, item = graph.n_senders, 2 if dtype == "bfloat16" else 4
    buffers = {  # attribution buffers that force each regime at batch 8
        "receivers": batch * per_example(s, 4, None, 2),
        "chunk": batch * per_example(s, 2, 2, 1),
        "micro": 3 * per_example(s, 4, None, 1),
        "senders": per_example(s // 2, item, min(s // 2, 16) if item == 2 else None, 1),
    }[regime]
    budget = int((fixed + buffers) / 0.9) + 1
    p = ctlens.plan(model, batch_size=batch, seq_len=seq, mlp_groups=mlp_groups, budget=budget)
    fit = p.attribution
    assert fit is not None and p.max_memory is not None and p.fits
    assert fit == fit_attribution(model, graph, seq, batch, batch, p.max_memory)
    assert {"receivers": fit.receivers is not None, "chunk": fit.chunk is not None
            and fit.batch_size == batch, "micro": fit.batch_size == runs and fit.senders is None,
            "senders": fit.senders is not None}[regime]
    run = fit.batch_size or batch
    rows = graph.n_senders if fit.senders is None else fit.senders
    item = fit.buffer_dtype.itemsize
    assert p.parts["sender buffer"] + p.parts["receiver gradients"] == run * per_example(
        rows, item, fit.chunk, fit.receivers
    ) <= p.max_memory
    assert "attribute(..., batch_size=8, max_memory=" in p.table()


def test_attribution_plan_refuses_what_even_sender_chunks_cannot_fit() -> None:
    with pytest.raises(MemoryBudgetError, match="even with one sender per pass"):
        ctlens.plan("llama-3.1-8b", dtype="bfloat16", seq_len=8192, batch_size=1,
                    budget="80GB")


def test_plan_speaks_the_tuner_words() -> None:
    """``operation=`` (what ``--mode`` sets; ``mode=`` still reads) is not a TuneConfig
    mode; ``shard="fsdp"`` is TuneConfig's word, ``True`` reads as it, and the JSON of
    ``ctlens plan --json`` keeps its keys and values."""
    fsdp = ctlens.plan("gpt2", operation="tune", ranks=4, shard="fsdp")
    legacy = ctlens.plan("gpt2", mode="tune", ranks=4, shard=True)
    assert fsdp.parts == legacy.parts and fsdp.operation == legacy.operation == "tune"
    assert fsdp.to_dict()["shard"] is True and fsdp.to_dict()["mode"] == "tune"
    assert ctlens.plan("gpt2", ranks=4, shard=None).to_dict()["shard"] is False
    assert ctlens.plan("gpt2", ranks=4, shard=False).parts == \
        ctlens.plan("gpt2", ranks=4).parts
    with pytest.raises(ValueError, match="shard must be one of 'fsdp'; got 'ddp'"):
        ctlens.plan("gpt2", shard="ddp")
    with pytest.raises(ValueError, match="operation must be one of"):
        ctlens.plan("gpt2", operation="train")
    with pytest.raises(ValueError, match="give one"):
        ctlens.plan("gpt2", operation="tune", mode="forward")
