"""``detox.wrap``: one entry point for every backend; picks the adapter from the model's type."""

from __future__ import annotations

import os
from typing import Any

from detox.artifacts.manifest import TargetFingerprint
from detox.artifacts.shipped import find_shipped_for, no_shipped_match_message
from detox.artifacts.store import ArtifactError
from detox.fusion import FusedWrapper
from detox.runtime import Calibrator


def resolve_calibrator(calibrator: Calibrator | str | os.PathLike[str] | None, fingerprint: TargetFingerprint,
                       require_signature: Any = None) -> Calibrator:
    """Load the calibrator a user named (or the shipped one that matches) and check it fits the target.

    A string that is not an existing path but looks like ``NAME@RANGE`` is resolved through the registry
    (``$DETOX_REGISTRY``): the newest version in range aligned to this exact target.
    """
    if calibrator is None:
        path = find_shipped_for(fingerprint)
        if path is None:
            raise ArtifactError(no_shipped_match_message(fingerprint))
        calibrator = Calibrator.load(path, require_signature=require_signature)
    elif isinstance(calibrator, Calibrator):
        if require_signature is not None:  # re-check the files it was loaded from
            calibrator = Calibrator.load(calibrator.path, require_signature=require_signature)
    else:
        from detox.artifacts.registry import looks_like_ref, open_registry

        if not os.path.exists(calibrator) and looks_like_ref(str(calibrator)):
            _, _, calibrator = open_registry().pull(str(calibrator), fingerprint)
        calibrator = Calibrator.load(calibrator, require_signature=require_signature)
    calibrator.require_aligned_to(fingerprint)
    return calibrator


def _is_transformers_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _is_llama_cpp_model(model: Any) -> bool:
    """True for ``llama_cpp.Llama`` (and subclasses); never imports llama_cpp: a Llama exists only if it was imported."""
    import sys

    module = sys.modules.get("llama_cpp")
    return module is not None and isinstance(model, getattr(module, "Llama", ()))


def _is_ort_causal_lm(model: Any) -> bool:
    """True for optimum's ``ORTModelForCausalLM``; never imports optimum (such a model exists only if it was imported)."""
    import sys

    module = sys.modules.get("optimum.onnxruntime")
    return module is not None and isinstance(model, getattr(module, "ORTModelForCausalLM", ()))


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
    if _is_llama_cpp_model(model):  # checked first: the llama.cpp path must not import transformers or torch
        from detox.adapters.llamacpp import wrap_llama

        return wrap_llama(model, calibrator, strength, require_signature)
    if _is_ort_causal_lm(model):
        from detox.adapters.onnxruntime import wrap_ort

        return wrap_ort(model, calibrator, strength, tokenizer, require_signature)
    if _is_transformers_model(model):
        from detox.adapters.transformers import DetoxModel, load_tokenizer_for
        from detox.fingerprint import fingerprint_hf

        tokenizer = tokenizer or load_tokenizer_for(model)
        cal = resolve_calibrator(calibrator, fingerprint_hf(model, tokenizer), require_signature)
        return DetoxModel(model, cal, tokenizer, strength)
    raise TypeError(
        f"detox.wrap does not support {type(model).__module__}.{type(model).__name__}; "
        "supported: transformers causal LMs, llama_cpp.Llama, optimum.onnxruntime.ORTModelForCausalLM"
    )
