"""Small shared vocabulary: enums and frozen dataclasses used across the pipeline.

Everything here is plain data. Behaviour lives in the stage modules
(`graph`, `data`, `attribution`, `circuit`, `masking`, `tuning`, `viz`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def parse_choice(kind: type[E], value: object, name: str) -> E:
    """``value`` (a member or its string) as a member of ``kind``; otherwise one
    ``ValueError`` naming the option ``name`` and every choice."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}") from None


def check_positive_int(name: str, value: object) -> None:
    """One ``ValueError`` naming the option ``name`` unless ``value`` is an int above 0 (a
    bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Choice(str, Enum):
    """A closed set of option words that behaves as its plain strings.

    A member equals, hashes, prints and serialises (JSON, ``run.json``) as its value, so a
    configuration holding members reads, compares and writes exactly as one holding the
    strings; only the set of words is closed.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps")
"""The torch device types ctlens runs on (``meta`` holds no values; XLA and others are
untested): `ctlens.load_model` and every command's ``--device`` refuse the rest."""

COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")
"""The weight dtypes ctlens computes in. float8 and integer weights need scales or
dequantisation that the bridge does not apply."""


class Ablation(str, Enum):
    """What an ablated sender is replaced with (docs/concepts.md, Ablations).

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


class Mode(Choice):
    """What a circuit-tuning run trains (`ctlens.TuneConfig`'s ``mode``): the paper's
    ``gradient`` restriction, ``forward`` masking, ``both``, or a baseline (``full``
    fine-tuning, a ``random`` circuit, ``lora`` adapters)."""

    GRADIENT = "gradient"
    FORWARD = "forward"
    BOTH = "both"
    FULL = "full"
    RANDOM = "random"
    LORA = "lora"

    @property
    def uses_circuit(self) -> bool:
        """Whether the run selects and enforces a circuit (not ``full`` or ``lora``)."""
        return self in (Mode.GRADIENT, Mode.FORWARD, Mode.BOTH, Mode.RANDOM)

    @property
    def restricts_gradients(self) -> bool:
        """Whether only the circuit's parameters move (``random`` is enforced like
        ``gradient``)."""
        return self in (Mode.GRADIENT, Mode.BOTH, Mode.RANDOM)

    @property
    def masks_forward(self) -> bool:
        """Whether the training forward runs with the edges outside the circuit ablated."""
        return self in (Mode.FORWARD, Mode.BOTH)


class Selection(Choice):
    """How a tuner keeps its N edges: ``top_n`` (largest |score|) or ``top_nodes`` (|score|
    times both ends' summed |scores|, the paper's official code)."""

    TOP_N = "top_n"
    TOP_NODES = "top_nodes"


class Optimizer(Choice):
    """A tuner's optimizer: ``adamw`` or ``sgd`` (with momentum)."""

    ADAMW = "adamw"
    SGD = "sgd"


class Loss(Choice):
    """A tuner's training loss: the NLL of the ``target`` tokens or of the whole
    ``sequence``."""

    TARGET = "target"
    SEQUENCE = "sequence"


class Shard(Choice):
    """How a tuner shards the model across processes: ``fsdp`` (PyTorch FSDP2)."""

    FSDP = "fsdp"


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
