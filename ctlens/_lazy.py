"""Lazy package faces: a public name is imported from its module when first used.

``import ctlens`` (and ``import ctlens.tasks``, ``import ctlens.zoo``) must stay cheap, so a
package ``__init__`` lists its public names in a table instead of importing them::

    __getattr__, __dir__ = lazy_exports(__name__, {
        "Circuit": "ctlens.circuit",      # ctlens.Circuit is ctlens.circuit.Circuit
        "tasks": "ctlens.tasks:",         # a trailing colon: the module itself
    })

The first ``ctlens.Circuit`` imports ``ctlens.circuit`` and caches the object in the package
namespace (PEP 562), so later lookups cost nothing. Library modules import what they need
from the defining module (``from ctlens.circuit import Circuit``), never through a package
face, so the face can never sit in an import cycle.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` serving ``exports`` on first use.

    ``exports`` maps a public name to the module that defines it, or to ``"module:"`` when
    the name is that module itself.
    """
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, colon, _ = target.partition(":")
        module = importlib.import_module(module_name)
        value = module if colon else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
