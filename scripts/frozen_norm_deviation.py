"""How far the frozen-norm linearisation is from path patching the unmodified model.

Gemma 2/3 and OLMo-2 add ``norm(y)`` to the residual stream, ``y`` being a sublayer's whole
output. Under ``load_model(..., approximate="frozen-norm")`` a head's sender output is its
share ``w_eff * result_h / rms(y)`` of that, with the scale of its own run. The ground truth
here patches one edge ``head -> receiver`` in the *unmodified* model with the norm
recomputed: the receiver reads ``norm(y - result_h + result_h^ref) - norm(y)`` more. Edges
from ``input`` and MLPs are not approximated (an MLP's sender output is its whole
normalised output), so only head-sender edges can differ; the table reports those.

For each family (small random models, float64, HF's initialisation, corrupt ablation on
random prompts) it prints, per method (EAP, ``exact`` and ``edge_mask`` under the
linearisation), the correlation with the ground truth over head-sender edges, the largest
absolute error relative to the largest true effect, and how many of the true top-10 edges
the method also ranks top-10. Run: ``python scripts/frozen_norm_deviation.py``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import transformers

import ctlens
from ctlens.bridge.hooks import receiver_hooks
from ctlens.graph import Graph
from ctlens.types import NodeKind

SHAPE = dict(
    vocab_size=64,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=32,
)
FAMILIES = {
    "Gemma 2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 16}),
    "Gemma 3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {"head_dim": 16}),
    "OLMo-2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
}


def build(family: str, seed: int) -> Any:
    arch, config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**SHAPE, **extra)
    module = getattr(transformers, arch)(config).to(torch.float64).eval()
    return ctlens.load_model(module, approximate="frozen-norm")


def task(seed: int, n: int = 8, seq: int = 8) -> ctlens.TaskData:
    gen = torch.Generator().manual_seed(seed)
    v = SHAPE["vocab_size"]
    return ctlens.TaskData(
        clean=torch.randint(1, v, (n, seq), generator=gen),
        corrupt=torch.randint(1, v, (n, seq), generator=gen),
        correct=torch.randint(1, v, (n,), generator=gen),
        wrong=torch.randint(1, v, (n,), generator=gen),
    )


def metric_of(data: ctlens.TaskData) -> Any:
    rows = torch.arange(len(data))

    def metric(logits: torch.Tensor) -> float:
        at = logits[rows, -1]
        return float((at[rows, data.correct] - at[rows, data.wrong]).mean())

    return metric


@torch.no_grad()
def path_patched(model: Any, graph: Graph, data: ctlens.TaskData) -> torch.Tensor:
    """Ground truth for every valid head-sender edge: the unmodified model, norm recomputed."""
    metric = metric_of(data)
    names = [f"blocks.{layer}.attn.hook_result" for layer in range(graph.spec.n_layers)]
    _, clean = model.run_with_cache(data.clean, names_filter=lambda n: n in names)
    _, ref = model.run_with_cache(data.corrupt, names_filter=lambda n: n in names)
    base = metric(model(data.clean))
    truth = torch.full((graph.n_senders, graph.n_receivers), float("nan"), dtype=torch.float64)
    for s, node in enumerate(graph.sender_nodes):
        if node.kind is not NodeKind.HEAD:
            continue
        name, h = names[node.layer], node.head
        y = clean[name].sum(2)
        swapped = y - clean[name][:, :, h] + ref[name][:, :, h]
        norm = model.blocks[node.layer].ln1_post
        delta = norm(swapped) - norm(y)
        for r in graph.valid[s].nonzero().flatten().tolist():

            def add(
                columns: slice, n_up: int, x: torch.Tensor, r: int = r, d: torch.Tensor = delta
            ) -> torch.Tensor:
                if columns.start <= r < columns.stop:
                    x = x.clone()
                    if x.ndim == 4:
                        x[:, :, r - columns.start] += d
                    else:
                        x += d
                return x

            logits = model.run_with_hooks(data.clean, fwd_hooks=receiver_hooks(model, graph, add))
            truth[s, r] = metric(logits) - base
    return truth


@torch.no_grad()
def masked(model: Any, graph: Graph, data: ctlens.TaskData, edges: torch.Tensor) -> torch.Tensor:
    """`edge_mask` with all edges but one: the metric change from dropping that edge."""
    metric = metric_of(data)
    base = metric(model(data.clean))
    out = torch.full((graph.n_senders, graph.n_receivers), float("nan"), dtype=torch.float64)
    for s, r in edges.tolist():
        keep = graph.valid.clone()
        keep[s, r] = False
        with ctlens.edge_mask(model, ctlens.Circuit(graph, keep), "corrupt", data.corrupt):
            out[s, r] = metric(model(data.clean)) - base
    return out


def compare(estimate: torch.Tensor, truth: torch.Tensor, k: int = 10) -> tuple[float, float, int]:
    corr = float(torch.corrcoef(torch.stack([estimate, truth]))[0, 1])
    rel = float((estimate - truth).abs().max() / truth.abs().max())
    top_true = set(truth.abs().argsort(descending=True)[:k].tolist())
    top_est = set(estimate.abs().argsort(descending=True)[:k].tolist())
    return corr, rel, len(top_true & top_est)


def measure(family: str, seeds: list[int]) -> dict[str, list[tuple[float, float, int]]]:
    results: dict[str, list[tuple[float, float, int]]] = {"eap": [], "exact": [], "edge_mask": []}
    for seed in seeds:
        model = build(family, seed)
        graph = Graph.from_model(model)
        data = task(seed)
        truth = path_patched(model, graph, data)
        heads = ~truth.isnan()
        kw: dict[str, Any] = {"ablation": "corrupt", "progress": False}
        eap = ctlens.attribute(model, data, **kw).scores.double()
        exact = ctlens.attribute(model, data, method="exact", **kw).scores.double()
        mask = masked(model, graph, data, heads.nonzero())
        for name, est in (("eap", eap), ("exact", exact), ("edge_mask", mask)):
            results[name].append(compare(est[heads], truth[heads]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="random models per family")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    print("| Family | Method | corr. with truth | max error / max effect | top-10 overlap |")
    print("|---|---|---|---|---|")
    for family in FAMILIES:
        for method, rows in measure(family, seeds).items():
            corr = min(r[0] for r in rows)
            rel = max(r[1] for r in rows)
            overlap = min(r[2] for r in rows)
            print(f"| {family} | {method} | {corr:.3f} | {rel:.2f} | {overlap}/10 |")
    print(f"\n(worst of {len(seeds)} random models per family)")


if __name__ == "__main__":
    main()
