"""What a model name names, decided without loading anything (no torch, no transformers).

`ctlens.load_model` and the command line (which checks names before torch is imported, so
a typo fails in a fraction of a second) read a model name the same way:

- ``"zoo:NAME"``: a model shipped with ctlens (`ctlens.zoo.names`); other names are refused
  with the list of shipped ones;
- an existing directory: a local HuggingFace model directory (it must hold ``config.json``);
- a text that looks like a path (a suffix, or starting with ``.``, ``/`` or ``~``) but is no
  directory: refused;
- anything else: a hub name, usable when it is in the local hub cache or the HuggingFace
  Hub can be reached (`check_hub`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ctlens import zoo

ZOO_PREFIX = "zoo:"

SourceKind = Literal["zoo", "directory", "hub"]


class HubUnreachableError(ConnectionError, ValueError):
    """A hub name was given but the HuggingFace Hub cannot be reached (and the model is not
    cached). A `ConnectionError` (an ``OSError``) and a ``ValueError``, so callers that
    report bad input in one line (the CLI) catch it."""


def source_kind(text: str) -> SourceKind:
    """Which kind of model source ``text`` names; refuses what cannot be one (see above)."""
    if text.startswith(ZOO_PREFIX):
        zoo.model_dir(text[len(ZOO_PREFIX) :])  # an unknown name raises, listing the shipped
        return "zoo"
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} holds no config.json; is it a HuggingFace model directory?"
            )
        return "directory"
    if path.suffix or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{text!r} is not a model directory; pass a directory holding config.json and "
            "weights, a zoo name like 'zoo:tiny-gpt2', or a hub name like 'gpt2'"
        )
    return "hub"


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the HuggingFace Hub endpoint opens within ``timeout``."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_hint(name: str) -> str:
    """What to use instead of a hub name that cannot be loaded."""
    if name in zoo.names():
        return f"did you mean 'zoo:{name}'?"
    return f"use a zoo model ('zoo:NAME'; shipped: {', '.join(zoo.names())}) or a local directory"


def check_hub(name: str, reachable: Callable[[], bool] = hub_reachable) -> None:
    """Refuse a hub name that is neither cached nor loadable now (offline, or no network)."""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not cached and (offline or not reachable()):
        raise HubUnreachableError(
            f"{name!r} is not a zoo model, a directory or a cached hub model, and the "
            f"HuggingFace Hub cannot be reached (offline?): {hub_hint(name)}"
        )


def check_source(text: str) -> SourceKind:
    """`source_kind`, and for a hub name `check_hub`: what a command checks up front."""
    kind = source_kind(text)
    if kind == "hub":
        check_hub(text)
    return kind
