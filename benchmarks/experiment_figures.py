"""Figures of the circuit-tuning experiment, from the results JSON (plotly).

`pareto_figure` is also what the circuit-tuning notebook shows (it reads the stored JSON).
Written as static PNG when kaleido can render (``pip install 'ctlens[export]'``), else as
standalone HTML; `write_figures` returns the written paths relative to docs/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from experiment import PAPER, is_full
from plotly.subplots import make_subplots

KINDS = ("attention q/k/v", "attention out", "MLP in", "MLP out", "embeddings", "norms",
         "unembedding")
TRAINABLE_KINDS = KINDS[:4]
KIND_COLOURS = dict(zip(KINDS, ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a",
                                "#19d3f3", "#ff6692"), strict=True))
COLOURS = {"full": "#444444", "gradient": "#1f77b4", "forward": "#17becf",
           "random-parameters": "#d62728", "random-composition": "#ff7f0e", "lora": "#2ca02c"}


def _sizes(results: dict[str, Any], model: str) -> list[float]:
    return sorted({c["size"] for c in results["conditions"]
                   if c["model"] == model and c["size"] is not None and c.get("curve")})


def _models(results: dict[str, Any]) -> list[str]:
    return sorted({c["model"] for c in results["conditions"] if c.get("curve")})


def _shown(c: dict[str, Any], groups: int, paper: bool) -> bool:
    """Whether condition ``c`` belongs in a figure of ``groups`` and of the paper-* modes
    (``paper``) or of the others."""
    return bool(c.get("curve")) and c["mode"].startswith(PAPER) == paper and (
        c["groups"] == groups or is_full(c["mode"]))


def _line(mode: str) -> dict[str, Any]:
    return {"color": COLOURS.get(mode.removeprefix(PAPER)),
            "dash": "dash" if mode.startswith(PAPER) else "solid"}


def _loss_range(results: dict[str, Any], model: str, groups: int, paper: bool) -> list[float]:
    """The general-loss axis of ``model``'s panels: every shown mode's mean path but
    ``forward``'s, whose loss runs far off (its lines leave the panel; the tables have its
    numbers)."""
    values = [g[0] for c in results["conditions"] if c["model"] == model
              and _shown(c, groups, paper) and c["mode"] != "forward"
              for g in c["curve"]["general"]]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low)
    return [low - pad, high + pad]


def pareto_figure(results: dict[str, Any], groups: int = 1, paper: bool = False) -> go.Figure:
    """Target metric against general LM loss along training, mean over seeds with 95 %
    t-intervals on both axes; one panel per model and circuit size, one line per mode
    (full fine-tuning, which has no size, in every panel). Up and left is better.
    ``groups``: the MLP grouping shown; ``paper``: the paper-* modes instead of the others."""
    models = _models(results)
    n_cols = max([len(_sizes(results, m)) for m in models] + [1])
    titles = [f"{m.removeprefix('zoo:')}, {s:.1%} of edges" for m in models
              for s in _sizes(results, m)]
    fig = make_subplots(rows=max(1, len(models)), cols=n_cols, subplot_titles=titles,
                        shared_yaxes=True)
    shown = set()
    for row, model in enumerate(models, start=1):
        for col, size in enumerate(_sizes(results, model), start=1):
            for c in results["conditions"]:
                if c["model"] != model or not _shown(c, groups, paper) or \
                        c["size"] not in (size, None):
                    continue
                curve = c["curve"]
                xs = [g[0] for g in curve["general"]]
                ys = [t[0] for t in curve["target"]]
                fig.add_trace(go.Scatter(
                    x=xs, y=ys, mode="lines+markers", name=c["mode"],
                    legendgroup=c["mode"], showlegend=c["mode"] not in shown,
                    line=_line(c["mode"]),
                    error_x={"type": "data", "array": [g[1] or 0 for g in curve["general"]],
                             "thickness": 1},
                    error_y={"type": "data", "array": [t[1] or 0 for t in curve["target"]],
                             "thickness": 1},
                    hovertext=[f"step {s}" for s in curve["step"]],
                ), row=row, col=col)
                shown.add(c["mode"])
            fig.update_xaxes(title_text="general LM loss",
                             range=_loss_range(results, model, groups, paper), row=row, col=col)
        fig.update_yaxes(title_text="target: logit(wrong) - logit(right)", row=row, col=1)
    what = ("the authors' options (SGD, top-nodes, sequence loss)" if paper else "AdamW")
    mlps = "ungrouped MLPs" if groups == 1 else f"MLPs in {groups} neuron groups"
    fig.update_layout(title=f"Target vs general LM loss during training: {what}, {mlps}"
                            "<br><sub>mean and 95 % t-interval over seeds; up-left is "
                            "better; the axis spans every mode but forward, whose loss runs "
                            "past it</sub>",
                      height=380 * max(1, len(models)), width=420 * n_cols + 160,
                      template="plotly_white")
    return fig


def moved_figure(results: dict[str, Any], groups: int = 1) -> go.Figure:
    """Parameters moved at the end, split by node kind (fraction of all parameters, mean
    over seeds), with the trainable ceiling: the share of q/k/v, attention-out and MLP
    weights, the only kinds gradient restriction lets move by default."""
    models = _models(results)
    fig = make_subplots(rows=max(1, len(models)), cols=1,
                        subplot_titles=[m.removeprefix("zoo:") for m in models])
    shown = set()
    for row, model in enumerate(models, start=1):
        conds = [c for c in results["conditions"] if c["model"] == model
                 and c.get("moved_by_kind") and (c["groups"] == groups or is_full(c["mode"]))]
        conds.sort(key=lambda c: (-1 if c["size"] is None else c["size"], c["mode"]))
        if not conds:
            continue
        totals = conds[0]["kind_totals"]
        total = sum(totals.values())
        labels = [("all" if c["size"] is None else f"{c['size']:.1%}") + f" {c['mode']}"
                  for c in conds]
        for kind in KINDS:
            fig.add_trace(go.Bar(x=labels, y=[c["moved_by_kind"][kind] / total for c in conds],
                                 marker_color=KIND_COLOURS[kind],
                                 name=kind, legendgroup=kind, showlegend=kind not in shown),
                          row=row, col=1)
            shown.add(kind)
        ceiling = sum(totals[k] for k in TRAINABLE_KINDS) / total
        fig.add_hline(y=ceiling, line_dash="dash", row=row, col=1,
                      annotation_text=f"trainable ceiling {ceiling:.2f}")
        fig.update_yaxes(title_text="fraction of all parameters moved", range=[0, 1.02],
                         row=row, col=1)
    mlps = "ungrouped MLPs" if groups == 1 else f"MLPs in {groups} neuron groups"
    fig.update_layout(barmode="stack", height=460 * max(1, len(models)), width=1400,
                      template="plotly_white",
                      title="Parameters moved by node kind (mean over seeds) against the "
                            f"trainable ceiling, {mlps}")
    return fig


def _write(fig: go.Figure, path: Path) -> Path:
    """PNG when kaleido renders here, else standalone HTML (plotly.js from its CDN)."""
    try:
        fig.write_image(str(path.with_suffix(".png")), scale=1)
        return path.with_suffix(".png")
    except Exception:  # noqa: BLE001 - kaleido missing, or no browser it can drive
        fig.write_html(str(path.with_suffix(".html")), include_plotlyjs="cdn")
        return path.with_suffix(".html")


def write_figures(results: dict[str, Any], folder: Path) -> list[tuple[str, str]]:
    """Every figure under ``folder`` (per MLP grouping: the Pareto plot of the AdamW modes,
    of the paper-* modes, and parameters moved); [(caption, path relative to docs/)]."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for groups in sorted({c["groups"] for c in results["conditions"] if c.get("curve")}):
        tag = "" if groups == 1 else f"_g{groups}"
        mlps = "ungrouped MLPs" if groups == 1 else f"MLPs in {groups} neuron groups"
        figures = [
            (f"pareto{tag}", f"Target against general LM loss, AdamW modes, {mlps}",
             pareto_figure(results, groups)),
            (f"pareto_paper{tag}", f"Target against general LM loss, the authors' options, "
                                   f"{mlps}", pareto_figure(results, groups, paper=True)),
            (f"moved{tag}", f"Parameters moved by node kind against the trainable ceiling, "
                            f"{mlps}", moved_figure(results, groups)),
        ]
        for name, caption, fig in figures:
            if fig.data:
                path = _write(fig, folder / f"experiment_{name}")
                out.append((caption, str(path.relative_to(folder.parent))))
    return out
