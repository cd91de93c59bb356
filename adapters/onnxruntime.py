"""ONNX Runtime: optimum's ``ORTModelForCausalLM`` (a transformers ``GenerationMixin``) fused by the transformers
adapter. Only what differs lives here: ``W_out`` and the fingerprint come from the export's files (no PyTorch model),
the calibrator runs from ``calibrator.onnx`` on the target's execution providers (CUDA if available, else CPU).

Example::

    >>> from detox.adapters.onnxruntime import load_ort_target  # doctest: +SKIP
    >>> import detox
    >>> model, tok = load_ort_target("smollm2-onnx")  # written by: detox export-onnx --target smollm2 --out smollm2-onnx  # doctest: +SKIP
    >>> model = detox.wrap(model, calibrator="my-aligned", tokenizer=tok)  # doctest: +SKIP
    >>> model.generate(**tok("The weather today is", return_tensors="pt"), max_new_tokens=20)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Sequence

import torch

from detox.adapters.transformers import DetoxModel, limit_torch_threads
from detox.extras import optimum_onnx_message
from detox.onnx_export import fingerprint_onnx, load_export_tokenizer, onnx_model_file, onnx_output_embedding
from detox.resolve import resolve_calibrator
from detox.runtime import Calibrator

__all__ = ["DetoxORTModel", "default_providers", "resolve_providers", "load_ort_target",
           "wrap_ort", "calibrator_runner", "limit_torch_threads"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {
    "cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": "TensorrtExecutionProvider", "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "dml": "DmlExecutionProvider", "openvino": "OpenVINOExecutionProvider",
}


# ---------------------------------------------------------------------------------------------------------------
# Execution providers.


def _cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver); asks libcuda directly, so it needs no torch."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0:
            return int(count.value)
        return 0
    return 0


def default_providers() -> list[str]:
    """``[CUDA, CPU]`` when this onnxruntime build has CUDA and a GPU is present, else ``[CPU]``.

    ``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU, hence the device check.
    """
    import onnxruntime as ort

    if CUDA in ort.get_available_providers() and _cuda_device_count() > 0:
        return [CUDA, CPU]
    return [CPU]


def resolve_providers(spec: str | Sequence[str] | None = None) -> list[str]:
    """Execution providers from a user's choice: ``None``/``"auto"`` (see :func:`default_providers`), ``"cpu"``,
    ``"cuda"``, a comma-separated string or a list of full provider names; CPU is appended as the fallback.
    """
    import onnxruntime as ort

    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return default_providers()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted = [_ALIASES.get(s.strip().lower(), s.strip()) for s in items if s.strip()]
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        fix = (" Install the GPU build: pip uninstall -y onnxruntime && pip install 'detox[onnx-gpu]' (the two builds "
               "share one module name), on a machine with an NVIDIA driver." if CUDA in missing else "")
        raise ValueError(f"execution provider {', '.join(missing)} is not available in this onnxruntime build "
                         f"(available: {', '.join(available)}).{fix} Or use --provider cpu / providers=['cpu'].")
    return wanted if CPU in wanted else [*wanted, CPU]


# ---------------------------------------------------------------------------------------------------------------
# Loading and wrapping.


def load_ort_target(path: str | os.PathLike[str], providers: str | Sequence[str] | None = None,
                    **kwargs: Any) -> tuple[Any, Any]:
    """``(ORTModelForCausalLM, tokenizer)`` from an export directory (see ``detox export-onnx``), offline."""
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError as err:
        raise ImportError(optimum_onnx_message("the ONNX Runtime backend")) from err
    file = onnx_model_file(path)
    model = ORTModelForCausalLM.from_pretrained(str(file.parent), file_name=file.name, providers=resolve_providers(providers),
                                                local_files_only=True, **kwargs)
    return model, load_export_tokenizer(file.parent)


def calibrator_runner(calibrator: Calibrator, providers: Sequence[str] | None = None) -> Any:
    """The artifact's ``calibrator.onnx`` (for contrast artifacts: the expert/anti-expert pair in one graph) as an
    :class:`~detox.onnx_calibrator.OnnxRunner` on ``providers``: the calibrator's own (cached) runner on CPU, else a
    copy with a session with the same options on ``providers``."""
    import copy

    import onnxruntime as ort

    runner = calibrator.onnx_runner()
    if not providers or list(providers) == [CPU]:
        return runner
    moved = copy.copy(runner)
    moved.session = ort.InferenceSession(str(runner.path), runner.session.get_session_options(), providers=list(providers))
    return moved


class DetoxORTModel(DetoxModel):
    """An ``ORTModelForCausalLM`` whose ``generate`` applies the fusion (:func:`wrap_ort`): the head is built once
    from the graph's ``W_out``. On CPU torch runs on one thread during ``generate`` (it only does the loop's
    bookkeeping and the fusion term, and a second busy thread pool made each step several times slower on 2 cores),
    and ``overlap`` is on (the calibrator during ONNX Runtime's forward pass measured faster than after it)."""

    _overlap_one_row = True  # ONNX Runtime's forward pass is one call that releases the GIL throughout


def wrap_ort(model: Any, calibrator: Calibrator | str | os.PathLike[str] | None = None, strength: float | None = None,
             tokenizer: Any = None, require_signature: Any = None,
             calibrator_providers: str | Sequence[str] | None = None, torch_threads: int | None = 1,
             overlap: bool = True) -> DetoxORTModel:
    """``detox.wrap`` for ``ORTModelForCausalLM``: check the artifact against the export's fingerprint and wrap.

    ``calibrator_providers``: where the calibrator runs (default: the target session's providers).
    ``torch_threads``: torch threads during ``generate`` on CPU (``None``: leave torch's setting).
    ``overlap``: compute each step's fusion term while the target's forward pass runs (same values either way).
    """
    file = model.path
    tokenizer = tokenizer if tokenizer is not None else load_export_tokenizer(file.parent)
    weight = onnx_output_embedding(file)
    cal = resolve_calibrator(calibrator, fingerprint_onnx(file, tokenizer, weight, name=str(file.parent)), require_signature)
    head = cal.fusion_head(torch.from_numpy(weight).to(model.device))
    providers = model.providers if calibrator_providers is None else resolve_providers(calibrator_providers)
    return DetoxORTModel(model, cal, tokenizer, strength, overlap, head=head, runner=calibrator_runner(cal, providers),
                         torch_threads=torch_threads)
