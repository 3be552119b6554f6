"""Figures of the circuit-tuning experiment, from the results JSON (plotly).

`pareto_figure` is also what the circuit-tuning notebook shows (it reads the stored JSON).
Written as static PNG when kaleido can render (``pip install 'ctlens[export]'``), else as
standalone HTML; `write_figures` returns the written paths relative to docs/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from experiment_stats import mean_envelope
from plotly.subplots import make_subplots

PAPER = "paper-"
KINDS = ("attention q/k/v", "attention out", "MLP in", "MLP out", "embeddings", "norms",
         "unembedding")
TRAINABLE_KINDS = KINDS[:4]
KIND_COLOURS = dict(zip(KINDS, ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a",
                                "#19d3f3", "#ff6692"), strict=True))
COLOURS = {"full": "#444444", "gradient": "#1f77b4", "forward": "#17becf",
           "random-parameters": "#d62728", "random-composition": "#ff7f0e", "lora": "#2ca02c"}


def cells_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The results' cells. Results written before the envelope protocol (one lr per mode,
    no ``cells``) give one cell per condition, its envelope over that single lr: each
    line is then that lr's path."""
    if "cells" in results:
        return results["cells"]
    return [{**{k: c[k] for k in ("model", "groups", "size", "mode")}, "lrs": [c["lr"]],
             "best_lrs": [c["lr"]],
             "curve": mean_envelope({s: [p] for s, p in c.get("points_by_seed", {}).items()})}
            for c in results["conditions"] if c.get("lr") is not None]


def _is_full(mode: str) -> bool:
    return mode.removeprefix(PAPER) == "full"


def _sizes(results: dict[str, Any], model: str) -> list[float]:
    return sorted({c["size"] for c in cells_of(results)
                   if c["model"] == model and c["size"] is not None and c["curve"]["target"]})


def _models(results: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(c["model"] for c in cells_of(results) if c["curve"]["target"]))


def _shown(c: dict[str, Any], groups: int, paper: bool) -> bool:
    """Whether cell ``c`` belongs in a figure of ``groups`` and of the paper-* modes
    (``paper``) or of the others."""
    return bool(c["curve"]["target"]) and c["mode"].startswith(PAPER) == paper and (
        c["groups"] == groups or _is_full(c["mode"]))


def _line(mode: str) -> dict[str, Any]:
    return {"color": COLOURS.get(mode.removeprefix(PAPER)),
            "dash": "dash" if mode.startswith(PAPER) else "solid"}


def _band(mode: str) -> str:
    """The mode's colour, mostly transparent (its 95 % band)."""
    colour = COLOURS.get(mode.removeprefix(PAPER), "#888888").lstrip("#")
    red, green, blue = (int(colour[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({red},{green},{blue},0.15)"


def _loss_range(results: dict[str, Any], model: str, groups: int, paper: bool
                ) -> list[float] | None:
    """The general-loss axis of ``model``'s panels: the shown modes' mean envelopes but
    ``forward``'s, whose loss runs far off (a band of few seeds can be far wider too; both
    are clipped, the tables have their numbers)."""
    values = [g[0] for c in cells_of(results) if c["model"] == model and c["mode"] != "forward"
              and _shown(c, groups, paper) for g in c["curve"]["general"]]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = 0.1 * (high - low) or 0.05
    return [low - pad, high + pad]


def pareto_figure(results: dict[str, Any], groups: int = 1, paper: bool = False) -> go.Figure:
    """Target metric against general LM loss on each mode's envelope over the lrs: at each
    target, the lowest general loss any lr had at its first crossing, mean over seeds with
    95 % t-intervals, up to the highest target every seed reached; one panel per model and
    circuit size, one line per mode (full fine-tuning, which has no size, in every panel).
    Left is better. ``groups``: the MLP grouping shown; ``paper``: the paper-* modes."""
    models = _models(results)
    n_cols = max([len(_sizes(results, m)) for m in models] + [1])
    titles = [f"{m.removeprefix('zoo:')}, {s:.1%} of edges" for m in models
              for s in _sizes(results, m)]
    fig = make_subplots(rows=max(1, len(models)), cols=n_cols, subplot_titles=titles,
                        shared_yaxes=True)
    shown = set()
    for row, model in enumerate(models, start=1):
        for col, size in enumerate(_sizes(results, model), start=1):
            for c in cells_of(results):
                if c["model"] != model or not _shown(c, groups, paper) or \
                        c["size"] not in (size, None):
                    continue
                curve = c["curve"]
                means = [g[0] for g in curve["general"]]
                halves = [g[1] or 0.0 for g in curve["general"]]
                fig.add_trace(go.Scatter(  # the 95 % band: one closed polygon
                    x=[m + h for m, h in zip(means, halves, strict=True)]
                    + [m - h for m, h in zip(means[::-1], halves[::-1], strict=True)],
                    y=curve["target"] + curve["target"][::-1], fill="toself", mode="none",
                    fillcolor=_band(c["mode"]), legendgroup=c["mode"], showlegend=False,
                    hoverinfo="skip"), row=row, col=col)
                fig.add_trace(go.Scatter(
                    x=means, y=curve["target"], mode="lines", name=c["mode"],
                    legendgroup=c["mode"], showlegend=c["mode"] not in shown,
                    line=_line(c["mode"])), row=row, col=col)
                shown.add(c["mode"])
            fig.update_xaxes(title_text="general LM loss (envelope over lrs)",
                             range=_loss_range(results, model, groups, paper), row=row, col=col)
        fig.update_yaxes(title_text="target: logit(wrong) - logit(right)", row=row, col=1)
    what = ("the authors' options (SGD, top-nodes, sequence loss)" if paper else "AdamW")
    mlps = "ungrouped MLPs" if groups == 1 else f"MLPs in {groups} neuron groups"
    fig.update_layout(title=f"Target vs general LM loss, envelope over the lrs: {what}, {mlps}"
                            "<br><sub>mean and 95 % t-interval over seeds; left is better; "
                            "each line stops at the highest target every seed reached</sub>",
                      height=380 * max(1, len(models)), width=max(760, 420 * n_cols + 160),
                      template="plotly_white")
    return fig


def _at_best_lr(results: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any] | None:
    """The condition of ``cell`` at its (first) best lr."""
    if not cell["best_lrs"]:
        return None
    lr = cell["best_lrs"][0]
    return next((c for c in results["conditions"] if c.get("moved_by_kind") and c["lr"] == lr
                 and all(c[k] == cell[k] for k in ("model", "groups", "size", "mode"))), None)


def moved_figure(results: dict[str, Any], groups: int = 1) -> go.Figure:
    """Parameters moved at the end, split by node kind (fraction of all parameters, mean
    over seeds), each mode at its best lr, with the trainable ceiling: the share of q/k/v,
    attention-out and MLP weights, the only kinds gradient restriction lets move."""
    models = _models(results)
    fig = make_subplots(rows=max(1, len(models)), cols=1,
                        subplot_titles=[m.removeprefix("zoo:") for m in models])
    shown = set()
    for row, model in enumerate(models, start=1):
        cells = [c for c in cells_of(results) if c["model"] == model
                 and (c["groups"] == groups or _is_full(c["mode"]))]
        conds = [(c, x) for c in cells if (x := _at_best_lr(results, c)) is not None]
        conds.sort(key=lambda p: (-1 if p[0]["size"] is None else p[0]["size"], p[0]["mode"]))
        if not conds:
            continue
        totals = conds[0][1]["kind_totals"]
        total = sum(totals.values())
        labels = [("all" if c["size"] is None else f"{c['size']:.1%}") +
                  f" {c['mode']} (lr {x['lr']:g})" for c, x in conds]
        for kind in KINDS:
            fig.add_trace(go.Bar(x=labels, y=[x["moved_by_kind"][kind] / total for _, x in conds],
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
                      title="Parameters moved by node kind (mean over seeds, each mode at its "
                            f"best lr) against the trainable ceiling, {mlps}")
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
    for groups in sorted({c["groups"] for c in cells_of(results) if c["curve"]["target"]}):
        tag = "" if groups == 1 else f"_g{groups}"
        mlps = "ungrouped MLPs" if groups == 1 else f"MLPs in {groups} neuron groups"
        figures = [
            (f"pareto{tag}", f"Target against general LM loss on the envelope over the lrs, "
                             f"AdamW modes, {mlps}", pareto_figure(results, groups)),
            (f"pareto_paper{tag}", f"Target against general LM loss on the envelope over the "
                                   f"lrs, the authors' options, {mlps}",
             pareto_figure(results, groups, paper=True)),
            (f"moved{tag}", f"Parameters moved by node kind against the trainable ceiling, "
                            f"{mlps}", moved_figure(results, groups)),
        ]
        for name, caption, fig in figures:
            if fig.data:
                path = _write(fig, folder / f"experiment_{name}")
                out.append((caption, str(path.relative_to(folder.parent))))
    return out
