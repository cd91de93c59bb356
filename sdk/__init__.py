"""detox: make any language model's generations less toxic without retraining it.

``detox.wrap(model)`` fuses an aligned calibration model into the target's output layer at every decoding
step (arXiv 2506.01266); ``detox.distill`` implements UniDetox dataset distillation (arXiv 2504.20500).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"  # the only place the version is written: pyproject.toml reads it (dynamic)

__all__ = ["__version__", "wrap", "Calibrator", "FusionLogitsProcessor"]
_HOME = {"wrap": "detox.wrapping", "Calibrator": "detox.runtime",
         "FusionLogitsProcessor": "detox.adapters.transformers"}


def __getattr__(name: str) -> Any:
    # Lazy: `import detox` must stay cheap and must not import torch-only backends a user lacks.
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'detox' has no attribute {name!r}")
