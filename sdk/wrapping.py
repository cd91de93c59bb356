"""``detox.wrap``: one entry point for every backend; picks the adapter from the model's type."""

from __future__ import annotations

import os
from typing import Any

from detox.artifacts.manifest import TargetFingerprint
from detox.artifacts.shipped import find_shipped_for, no_shipped_match_message
from detox.artifacts.store import ArtifactError
from detox.runtime import Calibrator



def resolve_calibrator(calibrator: Calibrator | str | os.PathLike[str] | None, fingerprint: TargetFingerprint) -> Calibrator:
    """Load the calibrator a user named (or the shipped one that matches) and check it fits the target."""
    if calibrator is None:
        path = find_shipped_for(fingerprint)
        if path is None:
            raise ArtifactError(no_shipped_match_message(fingerprint))
        calibrator = Calibrator.load(path)
    elif not isinstance(calibrator, Calibrator):
        calibrator = Calibrator.load(calibrator)
    calibrator.require_aligned_to(fingerprint)
    return calibrator


def _is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def wrap(model: Any, calibrator: Calibrator | str | os.PathLike[str] | None = None, strength: float | None = None,
         tokenizer: Any = None) -> Any:
    """Return ``model`` with the calibrator fused into its output layer at every decoding step.

    ``calibrator``: an aligned artifact (path or :class:`Calibrator`); ``None`` picks the shipped one whose
    target fingerprint matches ``model`` and otherwise explains how to run ``detox align``.
    ``strength``: fusion weight λ in [0, 1] (default: the artifact's recommended value).

    Example::

        >>> import detox
        >>> model = detox.wrap(model, tokenizer=tokenizer)  # doctest: +SKIP
        >>> model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)  # doctest: +SKIP
    """
    if _is_transformers_model(model):
        from detox.adapters.transformers import DetoxModel, load_tokenizer_for
        from detox.fingerprint import fingerprint_hf

        tokenizer = tokenizer or load_tokenizer_for(model)
        cal = resolve_calibrator(calibrator, fingerprint_hf(model, tokenizer))
        return DetoxModel(model, cal, tokenizer, strength)
    raise TypeError(
        f"detox.wrap does not support {type(model).__module__}.{type(model).__name__}; "
        "supported: transformers causal LMs"
    )
