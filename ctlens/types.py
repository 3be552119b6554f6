"""Small shared vocabulary: enums and frozen dataclasses used across the pipeline.

Everything here is plain data. Behaviour lives in the stage modules
(`graph`, `data`, `attribution`, `circuit`, `masking`, `tuning`, `viz`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps")
"""The torch device types ctlens runs on (``meta`` holds no values; XLA and others are
untested): `ctlens.load_model` and every command's ``--device`` refuse the rest."""

COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
"""The weight dtypes ctlens computes in. float8 and integer weights need scales or
dequantisation that the bridge does not apply."""


class Ablation(str, Enum):
    """What an ablated sender is replaced with (DESIGN.md, Attribution).

    - ``corrupt``: its activation on the paired corrupted prompt.
    - ``mean``: its mean activation per position over a reference set, padding excluded.
    - ``zero``: zero.
    """

    CORRUPT = "corrupt"
    MEAN = "mean"
    ZERO = "zero"

    @classmethod
    def parse(cls, value: str | Ablation) -> Ablation:
        """Return the member for ``value`` or raise a ``ValueError`` listing the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown ablation {value!r}; choose one of {choices}") from None


class Method(str, Enum):
    """How edges are scored: first-order EAP, integrated-gradients EAP-IG, or exact patching."""

    EAP = "eap"
    EAP_IG = "eap-ig"
    EXACT = "exact"

    @classmethod
    def parse(cls, value: str | Method) -> Method:
        """Return the member for ``value`` or raise a ``ValueError`` listing the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown method {value!r}; choose one of {choices}") from None


class NodeKind(str, Enum):
    """The kind of a graph node. Senders are input/head/mlp; receivers are q/k/v/mlp/logits."""

    INPUT = "input"
    HEAD = "head"
    MLP = "mlp"
    Q = "q"
    K = "k"
    V = "v"
    LOGITS = "logits"


@dataclass(frozen=True)
class Node:
    """One sender or receiver of the edge graph.

    ``layer`` is ``None`` for ``input`` and ``logits``; ``head`` is the attention head index
    for head senders and q receivers, and the KV-head (group) index for k/v receivers of a
    grouped-query model.
    """

    name: str
    kind: NodeKind
    layer: int | None = None
    head: int | None = None
