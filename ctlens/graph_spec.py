"""What determines a graph: `GraphSpec` (layer and head counts, block layout, MLP groups,
approximation, token spans) and its JSON form; `ctlens.graph.Graph` builds the nodes and
edges from it. Files record a graph by its spec (`GraphSpec.to_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ctlens.bridge.families import approximation
from ctlens.spans import check_span_names

GRAPH_SPEC_VERSION = 1


@dataclass(frozen=True)
class GraphSpec:
    """Everything that determines a graph: layer and head counts and the block layout.

    ``parallel_attn_mlp`` is True for GPT-NeoX style blocks, where a layer's MLP reads the
    same residual stream as that layer's heads (so it cannot read their outputs).
    ``mlp_groups`` is the number of equal neuron groups each MLP is split into (1: each MLP
    is one node ``m{l}``; G > 1: nodes ``m{l}.n0`` .. ``m{l}.n{G-1}``). Whether it divides
    the MLP width is checked where the model is known (`Graph.from_model`).
    ``approximate`` is ``"frozen-norm"`` for models loaded with that opt-in (Gemma 2/3,
    OLMo-2): senders are then shares of normalised sublayer outputs (docs/attribution.md),
    and scores, circuits and runs on such a graph say so through its spec.
    ``spans`` names the token spans of a positional graph (empty: position-free).
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_attn_mlp: bool = False
    mlp_groups: int = 1
    approximate: str | None = None
    spans: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.spans is None or (not isinstance(self.spans, str) and len(self.spans) == 0):
            object.__setattr__(self, "spans", ())
        else:
            object.__setattr__(self, "spans", check_span_names(self.spans, "spans"))
        if self.n_layers < 1 or self.n_heads < 1 or self.n_kv_heads < 1:
            raise ValueError(f"a graph needs at least one layer and one head, got {self}")
        if (
            not isinstance(self.mlp_groups, int)
            or isinstance(self.mlp_groups, bool)
            or self.mlp_groups < 1
        ):
            raise ValueError(
                f"mlp_groups must be a positive integer (1: one node per MLP), got "
                f"{self.mlp_groups!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.approximate not in (None, "frozen-norm"):
            raise ValueError(
                f"unknown approximation {self.approximate!r}; expected None or 'frozen-norm'"
            )
        if self.approximate and self.mlp_groups != 1:
            raise ValueError(
                "MLP neuron groups are not supported under the frozen-norm approximation "
                "(a group's share of the normalised MLP output is not implemented); use "
                "mlp_groups=1"
            )

    @property
    def grouped(self) -> bool:
        """True when keys and values are shared by groups of heads (grouped-query attention)."""
        return self.n_kv_heads != self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, tagged with the spec version.

        ``mlp_groups`` is written only when it is not 1, ``approximate`` only when set and
        ``spans`` only for a positional graph, so files of plain graphs are unchanged.
        """
        fields = asdict(self)
        if self.mlp_groups == 1:
            del fields["mlp_groups"]
        if self.approximate is None:
            del fields["approximate"]
        if self.spans:
            fields["spans"] = list(self.spans)
        else:
            del fields["spans"]
        return {"version": GRAPH_SPEC_VERSION, **fields}

    @classmethod
    def from_model(cls, model: Any, mlp_groups: int = 1,
                   spans: Sequence[str] = ()) -> GraphSpec:
        """The spec of the graph of a model returned by `ctlens.load_model` (reads
        ``model.cfg``; builds nothing). ``mlp_groups`` must divide the MLP width."""
        cfg = model.cfg
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        check_mlp_groups(mlp_groups, int(getattr(cfg, "d_mlp", 0) or 0))
        return cls(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=n_kv,
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
            mlp_groups=mlp_groups,
            approximate=approximation(model),
            spans=tuple(spans or ()),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        """Inverse of `to_dict`; refuses specs written by an incompatible version."""
        version = data.get("version", GRAPH_SPEC_VERSION)
        if version != GRAPH_SPEC_VERSION:
            raise ValueError(
                f"graph spec version {version} is not supported (this ctlens reads version "
                f"{GRAPH_SPEC_VERSION}); upgrade ctlens or re-create the file"
            )
        fields = (
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "parallel_attn_mlp",
            "mlp_groups",
            "approximate",
            "spans",
        )
        missing = [f for f in fields[:3] if f not in data]
        if missing:
            raise ValueError(f"graph spec is missing {missing}; got keys {sorted(data)}")
        return cls(**{f: data[f] for f in fields if f in data})

    @property
    def positional(self) -> bool:
        """True when edges are split by token span."""
        return bool(self.spans)


def check_mlp_groups(mlp_groups: Any, d_mlp: int) -> None:
    """Raise a clear ``ValueError`` unless ``mlp_groups`` is a positive divisor of ``d_mlp``."""
    divisors = [g for g in range(1, d_mlp + 1) if d_mlp % g == 0] if d_mlp > 0 else []
    valid = isinstance(mlp_groups, int) and not isinstance(mlp_groups, bool) and mlp_groups >= 1
    if valid and (d_mlp <= 0 or d_mlp % mlp_groups == 0):
        return
    shown = ", ".join(map(str, divisors[:24])) + (" ..." if len(divisors) > 24 else "")
    raise ValueError(
        f"mlp_groups={mlp_groups!r} does not split the MLP width {d_mlp} into equal groups; "
        f"choose a divisor of {d_mlp}: {shown}"
    )
