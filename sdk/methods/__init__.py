"""Fusion methods, peft-style: one module per method, registered here by name (the manifest's ``alignment.fusion``).

A method module holds its config (:class:`~detox.methods.base.MethodConfig`: every default once), its head (what a
backend fuses with each step), how to build that head from an aligned artifact and a target's output matrix, its
aligner, and the ``detox align`` options it reads, bundled as a :class:`~detox.methods.base.FusionMethod` named
``METHOD``. Adding a method: add its module and tests, and list it in ``_MODULES`` below (docs/architecture.md).
"""

from __future__ import annotations

from detox.methods import contrast, interpolate
from detox.methods.base import FusionMethod, MethodConfig

_MODULES = (interpolate, contrast)
METHODS: dict[str, FusionMethod] = {m.METHOD.name: m.METHOD for m in _MODULES}


def get_method(name: str) -> FusionMethod:
    """The registered fusion method ``name``; a ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown fusion method {name!r}; this detox knows {', '.join(map(repr, METHODS))} "
                         "(an artifact made by a newer detox needs that version)") from None


__all__ = ["METHODS", "FusionMethod", "MethodConfig", "get_method"]
