"""ONNX Runtime (``onnx``): a directory written by ``detox export-onnx``, run by optimum's ``ORTModelForCausalLM``,
which decodes with transformers' ``generate``: everything but loading, fingerprinting and wrapping is the ``hf``
backend's."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

from detox.artifacts.manifest import TargetFingerprint
from detox.backends.hf import HFBackend, set_torch_threads
from detox.onnx_export import fingerprint_onnx, onnx_parameter_count
from detox.targets import load_hf_target


class OnnxBackend(HFBackend):
    name = "onnx"
    supports = "optimum.onnxruntime.ORTModelForCausalLM"
    model_class = ("optimum.onnxruntime", "ORTModelForCausalLM")

    @classmethod
    def load(cls, target: str, *, context_window: int = 2048, seed: int = 0, threads: int | None = None,
             provider: str | None = "auto") -> "OnnxBackend":
        from detox.adapters.onnxruntime import load_ort_target

        set_torch_threads(threads)
        model, tokenizer = load_ort_target(target, provider)
        return cls(model, tokenizer, target)

    def fingerprint(self) -> TargetFingerprint:
        return fingerprint_onnx(self.source if self.source is not None else self.model.path)

    def wrap(self, calibrator: Any = None, strength: float | None = None, require_signature: Any = None) -> Any:
        from detox.adapters.onnxruntime import wrap_ort

        self.fused = wrap_ort(self.model, calibrator, strength, self.tokenizer, require_signature)
        self.tokenizer = self.fused.tokenizer
        return self.fused

    def parameter_count(self) -> int:
        return onnx_parameter_count(self.model.path)

    def transformers_twin(self, fallback: str | None = None) -> tuple[Any, Any]:
        if fallback is None:  # an exported graph: transformers cannot load it
            raise ValueError("--reference-text on --backend onnx needs the same model in transformers format: pass --ppl-model")
        return load_hf_target(fallback)

    @classmethod
    def perplexity_problem(cls) -> str | None:
        return "no reference model for perplexity on backend onnx; pass --ppl-model or --no-perplexity"

    def _generation(self) -> ContextManager[Any]:
        """torch at the wrapper's thread count for the unfused model too, so both are timed alike (DetoxORTModel)."""
        threads = getattr(self.fused, "torch_threads", None)
        if threads is None or self.model.device.type != "cpu":
            return nullcontext()
        from detox.adapters.onnxruntime import limit_torch_threads

        return limit_torch_threads(threads)
