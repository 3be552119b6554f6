"""Attribution that fits a memory budget: chunked and micro-batched runs give the unbudgeted
scores (ctlens.memory)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_task, tiny_gpt2_module, tiny_llama_module

import ctlens
from ctlens.graph import Graph
from ctlens.memory import bytes_per_example, fit_attribution, parse_bytes


def build(family: str, dtype: torch.dtype):
    module = (tiny_gpt2_module if family == "gpt2" else tiny_llama_module)(dtype=dtype)
    return ctlens.load_model(module)


def need(model, data, itemsize: int, chunk: int | None) -> int:
    """Bytes per example that ctlens.memory charges for ``data`` on ``model``."""
    graph = Graph.from_model(model)
    cfg = model.cfg
    seq = data.clean.shape[1]
    return bytes_per_example(graph.n_senders, seq, cfg.d_model, cfg.n_heads, itemsize, chunk)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_micro_batched_equals_unbudgeted(family: str, method: str) -> None:
    """An fp32 model over budget runs smaller batches: the same scores, up to rounding."""
    model = build(family, torch.float32)
    data = random_task(n=6, seed=3)
    plain = ctlens.attribute(model, data, method, batch_size=6, progress=False)
    budget = 2 * need(model, data, 4, None)  # two examples per pass
    fitted = ctlens.attribute(
        model, data, method, batch_size=6, progress=False, max_memory=budget
    )
    assert fitted.metadata["memory"] == {
        "budget_bytes": budget, "batch_size": 2, "buffer_dtype": "float32", "chunk": None,
    }
    assert "memory" not in plain.metadata
    assert fitted.scores.dtype == torch.float32
    torch.testing.assert_close(fitted.scores, plain.scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_low_precision_buffer_chunked_equals_unchunked(family: str) -> None:
    """A bf16 model over budget keeps its sender buffer in bf16 and upcasts sender rows in
    chunks: any chunk size gives the same fp32 scores, close to the fp32-buffer run."""
    model = build(family, torch.bfloat16)
    data = random_task(n=4, seed=5)
    n_senders = Graph.from_model(model).n_senders
    fp32 = ctlens.attribute(model, data, batch_size=4, progress=False)
    runs = {}
    for chunk in (1, 3, n_senders // 2):
        budget = 4 * need(model, data, 2, chunk)
        scores = ctlens.attribute(model, data, batch_size=4, progress=False, max_memory=budget)
        assert scores.metadata["memory"]["buffer_dtype"] == "bfloat16"
        assert scores.metadata["memory"]["chunk"] == chunk
        assert scores.metadata["memory"]["batch_size"] == 4
        assert scores.scores.dtype == torch.float32
        runs[chunk] = scores.scores
    for chunk, scores in runs.items():
        torch.testing.assert_close(scores, runs[1], rtol=1e-5, atol=1e-7, msg=f"chunk {chunk}")
    scale = float(fp32.scores.abs().max())
    assert scale > 0
    torch.testing.assert_close(runs[1], fp32.scores, rtol=0, atol=2e-2 * scale)


def test_budget_errors_and_the_default_fit() -> None:
    model = build("gpt2", torch.float32)
    data = random_task(n=4)
    with pytest.raises(ValueError, match="attribution needs about .* per example"):
        ctlens.attribute(model, data, progress=False, max_memory=1000)
    with pytest.raises(ValueError, match="is not a size"):
        ctlens.attribute(model, data, progress=False, max_memory="lots")
    with pytest.raises(TypeError, match="max_memory must be bytes"):
        ctlens.attribute(model, data, progress=False, max_memory=2.5)  # type: ignore[arg-type]
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes(" 1.5 GiB ") == int(1.5 * 2**30)
    assert parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match="positive"):
        parse_bytes(0)
    graph = Graph.from_model(model)
    fit = fit_attribution(model, graph.n_senders, 7, 4, 32, None)  # tiny: fits anywhere
    assert (fit.buffer_dtype, fit.batch_size, fit.chunk) == (torch.float32, 32, None)
    assert not fit.changed(32)
