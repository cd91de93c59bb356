"""Every inference backend behind one interface (:class:`~detox.backends.base.Backend`), registered by name: each
module of this package defines one (docs/architecture.md, "Backends").

    >>> from detox.backends import get  # doctest: +SKIP
    >>> b = get("llamacpp").load("smollm2"); b.wrap(); b.generate("Hello", 20, False, 0.9, 1.0, 0, print)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from detox.backends.base import REGISTRY, Backend, Row, Sampling, TokenInfo

__all__ = ["Backend", "Row", "Sampling", "TokenInfo", "get", "names", "backend_for"]


@functools.cache
def _discover() -> dict[str, type[Backend]]:
    """Import every backend module of this package once (a new backend is found by being here)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


def names() -> list[str]:
    """The registered backends' names (``hf``, ``llamacpp``, ``onnx``, ...)."""
    return sorted(_discover())


def get(name: str) -> type[Backend]:
    """The backend registered as ``name``; ValueError naming the known ones otherwise."""
    backends = _discover()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}: use {', '.join(sorted(backends))}")
    return backends[name]


def backend_for(model: Any) -> type[Backend]:
    """The backend whose ``accepts(model)`` is true; TypeError listing what is supported otherwise."""
    for cls in _discover().values():
        if cls.accepts(model):
            return cls
    supported = ", ".join(cls.supports for cls in _discover().values())
    raise TypeError(f"detox.wrap does not support {type(model).__module__}.{type(model).__name__}; "
                    f"supported: {supported}")
