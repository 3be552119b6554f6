"""Attribution that fits a memory budget: receiver-chunked, low-precision, micro-batched and
sender-chunked runs give the unbudgeted scores (ctlens.memory)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_task, tiny_gpt2_module, tiny_llama_module

import ctlens
import ctlens.attribution as attribution_module
from ctlens.graph import Graph
from ctlens.memory import SenderLayout, bytes_per_example, fit_attribution, parse_bytes


def build(family: str, dtype: torch.dtype):
    module = (tiny_gpt2_module if family == "gpt2" else tiny_llama_module)(dtype=dtype)
    return ctlens.load_model(module)


def need(
    model, data, itemsize: int, chunk: int | None, queue: int | None = None,
    rows: int | None = None, graph: Graph | None = None,
) -> int:
    """Bytes per example that ctlens.memory charges for ``data`` on ``model`` (``rows``
    sender rows per pass, default all of ``graph``'s)."""
    graph = Graph.from_model(model) if graph is None else graph
    cfg = model.cfg
    width = max(cfg.n_heads, graph.spec.mlp_groups)
    layout = SenderLayout.of(model, graph)
    return bytes_per_example(layout, rows, data.clean.shape[1], width, itemsize, chunk, queue)


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
        "receivers": None, "senders": None,
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
    fit = fit_attribution(model, graph, 7, 4, 32, None)  # tiny: fits anywhere
    assert (fit.buffer_dtype, fit.batch_size, fit.chunk) == (torch.float32, 32, None)
    assert not fit.changed(32)


def recorded_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on attribution's sender buffers: the rows of each one allocated."""
    rows: list[int] = []
    real = attribution_module._reference_activations

    def spy(*args, **kwargs):
        buffers, logits = real(*args, **kwargs)
        rows.append(buffers[0].shape[0])
        return buffers, logits

    monkeypatch.setattr(attribution_module, "_reference_activations", spy)
    return rows


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_receiver_chunks_equal_the_full_queue(method: str) -> None:
    """A large fp32 buffer over budget first queues fewer receiver gradients per product:
    same batch, same fp32 buffer, the same scores to float rounding."""
    model = build("gpt2", torch.float32)
    graph = Graph.from_model(model, mlp_groups=128)  # 265 senders: gradients are queued
    data = random_task(n=4, seed=2)
    plain = ctlens.attribute(model, data, method, batch_size=4, progress=False, graph=graph)
    for queue in (1, 9):
        budget = 4 * need(model, data, 4, None, queue, graph=graph)
        fitted = ctlens.attribute(
            model, data, method, batch_size=4, progress=False, graph=graph, max_memory=budget
        )
        memory = fitted.metadata["memory"]
        assert (memory["receivers"], memory["batch_size"]) == (queue, 4)
        assert (memory["buffer_dtype"], memory["senders"]) == ("float32", None)
        torch.testing.assert_close(fitted.scores, plain.scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("family", "method", "ablation"),
    [("gpt2", "eap", "corrupt"), ("llama", "eap", "mean"), ("gpt2", "eap-ig", "corrupt"),
     ("llama", "eap-ig", "mean"), ("gpt2", "exact", "corrupt")],
)
def test_sender_chunks_equal_one_pass(
    family: str, method: str, ablation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one example's buffer does not fit, the senders are split into groups with their
    own passes: the buffers shrink to the group and the scores (and metrics) are those of
    one pass over all senders."""
    model = build(family, torch.float32)
    data = random_task(n=4, seed=4)
    graph = Graph.from_model(model)
    plain = ctlens.attribute(model, data, method, ablation, batch_size=4, progress=False)
    rows = recorded_rows(monkeypatch)
    for group in (1, 4):
        rows.clear()
        budget = need(model, data, 4, None, 1, rows=group)  # one example, ``group`` senders
        fitted = ctlens.attribute(
            model, data, method, ablation, batch_size=4, progress=False, max_memory=budget
        )
        memory = fitted.metadata["memory"]
        assert (memory["senders"], memory["batch_size"]) == (group, 1)
        groups = -(-graph.n_senders // group)
        assert len(rows) == 4 * groups and max(rows) == group  # 4 batches of one example
        assert fitted.metadata["metric_clean"] == pytest.approx(plain.metadata["metric_clean"])
        torch.testing.assert_close(fitted.scores, plain.scores, rtol=1e-5, atol=1e-7)


def test_sender_chunks_are_the_fewest_balanced_groups_then_the_largest_batch() -> None:
    """Each sender group costs a whole set of passes over every example, so the fit takes the
    fewest groups that hold one example, balances them, then fills the budget with examples."""
    model = build("llama", torch.bfloat16)
    data = random_task(n=6, seed=1)
    graph = Graph.from_model(model)
    n = graph.n_senders

    def one(rows: int) -> int:  # bf16 rows, upcast in chunks of up to 16 rows
        return need(model, data, 2, min(rows, 16), 1, rows=rows)

    for budget in (one(1), one(n // 2), 2 * one(2), one(n) - 1):
        assert budget < one(n)
        fit = fit_attribution(model, graph, data.clean.shape[1], 6, 6, budget)
        assert fit.buffer_dtype == torch.bfloat16 and fit.senders is not None
        sizes = [len(g) for g in fit.sender_groups(n)]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        fewer = -(-n // (len(sizes) - 1)) if len(sizes) > 1 else None
        assert fewer is None or one(fewer) > budget  # no fewer groups would fit
        assert fit.batch_size == min(6, budget // one(fit.senders)) >= 1
        assert fit.chunk == min(fit.senders, 16)


def test_too_small_for_one_sender_fails_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget below one example with one sender per pass is refused up front: no reference
    forward, no buffer."""
    model = build("gpt2", torch.float32)
    data = random_task(n=4)

    def never(*args, **kwargs):
        raise AssertionError("attribution started despite an impossible budget")

    monkeypatch.setattr(attribution_module, "resolve_reference", never)
    monkeypatch.setattr(attribution_module, "_reference_activations", never)
    budget = need(model, data, 4, None, 1, rows=1) - 1
    with pytest.raises(ValueError, match="even with one sender per pass") as err:
        ctlens.attribute(model, data, "eap", "mean", progress=False, max_memory=budget)
    assert "raise max_memory" in str(err.value)


def test_task_discovery_passes_the_tuners_budget() -> None:
    """TuneConfig.max_memory reaches the tuner's task discovery: a budget that forces sender
    chunks gives the scores of an unbudgeted discovery."""
    from ctlens.tuning.config import TuneConfig
    from ctlens.tuning.discovery import task_scores
    from ctlens.tuning.distributed import World

    model = build("gpt2", torch.float32)
    data = random_task(n=4, seed=6)
    graph = Graph.from_model(model)
    config = {"discovery": "task", "discovery_ablation": "corrupt", "batch_size": 4,
              "discovery_batches": 1}
    plain = task_scores(model, data, TuneConfig(**config), graph, 0, World())
    budget = need(model, data, 4, None, 1, rows=2)
    fitted = task_scores(model, data, TuneConfig(**config, max_memory=budget), graph, 0, World())
    torch.testing.assert_close(fitted, plain, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="even with one sender per pass"):
        task_scores(model, data, TuneConfig(**config, max_memory=budget // 4), graph, 0, World())


def test_one_reader_of_memory_sizes() -> None:
    """`ctlens.plan`'s budget and ``max_memory`` share `parse_bytes`: the union of what
    either accepted, one wording of each error, naming the option."""
    from ctlens import planner

    assert planner.parse_bytes is parse_bytes
    for text, size in (("80GB", 80 * 10**9), ("24 GiB", 24 * 2**30), ("8e9", 8 * 10**9),
                       (".5 kb", 500), ("512mib", 512 * 2**20), (8e9, 8 * 10**9)):
        assert parse_bytes(text) == size
    for bad in ("-1GB", "GB", "3 parsecs", "0.1B", "1e400"):
        with pytest.raises(ValueError, match=r"^budget="):
            parse_bytes(bad, "budget")
    with pytest.raises(TypeError, match="budget must be bytes"):
        parse_bytes(2.5, "budget")
    with pytest.raises(ValueError, match="budget='lots': cannot read the memory budget, it "
                                         "is not a size"):
        ctlens.plan("gpt2", budget="lots")
    assert ctlens.plan("gpt2", budget=24e9).budget_bytes == 24 * 10**9


@pytest.mark.parametrize(("family", "groups", "senders"),
                         [("gpt2", 1, None), ("gpt2", 8, None), ("gpt2", 128, None),
                          ("llama", 16, None), ("gpt2", 128, 100), ("llama", 16, 7)])
def test_sender_layout_counts_what_the_store_holds(
    family: str, groups: int, senders: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`SenderLayout.token_bytes` is the store's real allocation after scoring: its plain
    rows, each grouped layer's hidden activation and the expansion workspace (an oracle: the
    tensors `ctlens.attribute` allocated), and `largest_pass` the largest of a sender-chunked
    run's stores."""
    model = build(family, torch.float32)
    cfg = model.cfg
    data = random_task(n=3, seed=6)
    graph = Graph.from_model(model, mlp_groups=groups)
    layout = SenderLayout(cfg.n_layers, cfg.n_heads, cfg.d_model, groups, cfg.d_mlp)
    assert layout.n_senders == graph.n_senders
    assert [(r.start, r.stop) for r in layout.grouped_rows()] == (
        [] if groups == 1 else [(graph.mlp_senders(layer).start, graph.mlp_senders(layer).stop)
                                for layer in range(cfg.n_layers)])
    stores = []
    real = attribution_module.SenderStore

    def record(*args, **kwargs):
        stores.append(real(*args, **kwargs))
        return stores[-1]

    monkeypatch.setattr(attribution_module, "SenderStore", record)
    budget = None if senders is None else need(model, data, 4, None, 1, rows=senders, graph=graph)
    fitted = ctlens.attribute(model, data, graph=graph, batch_size=3, progress=False,
                              max_memory=budget)
    chunked = fitted.metadata.get("memory", {}).get("senders")
    assert (chunked is None) == (senders is None)
    held = []  # bytes per token of each store (batches are trimmed to their own length)
    for store in stores:
        work = 0 if store._work is None else store._work.nbytes
        total = store.plain.nbytes + sum(h.hidden.nbytes for h in store.layers) + work
        tokens = store.shape[1] * store.shape[2]
        assert total == tokens * layout.token_bytes(range(store.first, store.stop), 4)
        held.append(total // tokens)
    assert max(held) == layout.largest_pass(chunked, 4)
