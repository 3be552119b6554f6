"""The edge graphs of real models, from their configurations alone (no weights, no network).

For every shape in `ctlens.real_shapes` (GPT-2 small, Pythia, Qwen2.5, Gemma-2, Llama-3.x,
OLMo-2) this builds the `Graph` ctlens would use, once with one node per MLP and once with
MLP neuron groups of 64 neurons (``mlp_groups = d_mlp / 64``), and prints a markdown table of
senders, receivers and valid edges. docs/concepts.md holds its output; tests/test_graph.py
checks that the page matches. Run: ``python scripts/real_shape_graphs.py``.
"""

from __future__ import annotations

from typing import Any

from ctlens.bridge.families import FROZEN_NORM
from ctlens.graph import Graph, GraphSpec
from ctlens.real_shapes import SHAPES, RealShape

NEURONS_PER_GROUP = 64


def mlp_width(config: Any) -> int:
    """The MLP hidden width of an HF config (GPT-2's ``n_inner=None`` means 4 x d_model)."""
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return int(width or 4 * config.hidden_size)


def spec_of(shape: RealShape, grouped: bool) -> GraphSpec:
    """The graph spec `Graph.from_model` gives a loaded model of this shape."""
    config = shape.hf_config()
    heads = config.num_attention_heads
    groups = mlp_width(config) // NEURONS_PER_GROUP if grouped else 1
    return GraphSpec(
        n_layers=config.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        parallel_attn_mlp=bool(getattr(config, "use_parallel_residual", False)),
        mlp_groups=groups,
        # ctlens does not split MLPs into groups under frozen-norm (yet): the grouped row of
        # those models counts the graph's shape only
        approximate="frozen-norm" if shape.architecture in FROZEN_NORM and not grouped else None,
    )


def rows() -> list[tuple[str, str, int, int, int, int, int, int]]:
    """Per shape: name, architecture note, and (senders, receivers, edges) without and with
    64-neuron MLP groups."""
    out = []
    for shape in SHAPES.values():
        plain = Graph(spec_of(shape, grouped=False))
        grouped = Graph(spec_of(shape, grouped=True))
        s = plain.spec
        note = f"{s.n_layers} L, {s.n_heads} H, {s.n_kv_heads} KV, {grouped.spec.mlp_groups} G"
        if s.parallel_attn_mlp:
            note += ", parallel"
        if s.approximate:
            note += ", frozen-norm (groups: shape only)"
        out.append(
            (
                shape.name,
                note,
                plain.n_senders,
                plain.n_receivers,
                plain.n_edges,
                grouped.n_senders,
                grouped.n_receivers,
                grouped.n_edges,
            )
        )
    return out


def table() -> str:
    """The markdown table docs/concepts.md shows."""
    lines = [
        "| model | shape | senders | receivers | valid edges | senders (64-neuron groups) "
        "| receivers (groups) | valid edges (groups) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, note, *counts in rows():
        cells = " | ".join(f"{c:,}" for c in counts)
        lines.append(f"| {name} | {note} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
