"""``detox.wrap``: one entry point for every backend; the backend registry picks the adapter from the model's type."""

from __future__ import annotations

import os
from typing import Any

from detox.backends import backend_for
from detox.fusion import FusedWrapper
from detox.runtime import Calibrator

__all__ = ["wrap"]


def wrap(model: Any, calibrator: Calibrator | str | os.PathLike[str] | None = None, strength: float | None = None,
         tokenizer: Any = None, require_signature: Any = None) -> Any:
    """Return ``model`` with the calibrator fused into its output layer at every decoding step.

    ``calibrator``: an aligned artifact (path or :class:`Calibrator`); ``None`` picks the shipped one whose
    target fingerprint matches ``model`` and otherwise explains how to run ``detox align``.
    ``calibrator`` may also be a ``.detox`` archive or ``"NAME@RANGE"`` (e.g. ``"team-cal@^1.2"``), resolved
    through the registry in ``$DETOX_REGISTRY`` to the newest version in range aligned to ``model``.
    ``strength``: fusion weight λ, in [0, 1] for interpolate artifacts and [0, 20] for contrast ones (default: the artifact's recommended value).
    ``require_signature``: trusted public key(s) (PEM path or text); unsigned or otherwise-signed artifacts are refused.

    ``tokenizer``: the target's tokenizer; by default found offline where the model was loaded from (its directory,
    the hub cache, or the GGUF file it was read from; see :func:`detox.adapters.transformers.load_tokenizer_for`).

    Supported models: whatever a registered backend accepts (:mod:`detox.backends`): transformers causal LMs,
    ``llama_cpp.Llama`` and optimum's ``ORTModelForCausalLM``.

    Example::

        >>> import detox
        >>> model = detox.wrap(AutoModelForCausalLM.from_pretrained(path))  # doctest: +SKIP
        >>> model.generate(**model.tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)  # doctest: +SKIP
    """
    if isinstance(model, FusedWrapper):
        m = model.calibrator.manifest
        raise TypeError(
            f"this model is already wrapped by detox ({type(model).__name__} with {m.name}@{m.version}); wrap the "
            f"original model instead: detox.wrap(wrapped.{model._wrapped}, calibrator=...), or change the wrapper's "
            f"strength with wrapped.strength = ..."
        )
    return backend_for(model)(model, tokenizer).wrap(calibrator, strength, require_signature)
