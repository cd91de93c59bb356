"""llama.cpp backend (``llama-cpp-python``): the calibrator fused into a ``Llama``'s logits at every step, no torch.

llama-cpp-python exposes only next-token logits to Python (``logits_processor(input_ids, scores)``): the step engine
runs there on numpy, with the head built once per (artifact, GGUF file) and the calibrator run from the artifact's
``calibrator.onnx`` with ONNX Runtime.

Example::

    >>> from llama_cpp import Llama  # doctest: +SKIP
    >>> import detox
    >>> llm = detox.wrap(Llama("SmolLM2-135M-Instruct.Q4_1.gguf", verbose=False), calibrator="aligned-smollm2")  # doctest: +SKIP
    >>> llm("The weather today is", max_tokens=20, temperature=0.0)["choices"][0]["text"]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from detox.artifacts.manifest import TargetFingerprint
from detox.artifacts.store import ArtifactError
from detox.engine import FusionEngine, IncrementalDetokenizer
from detox.fingerprint import fingerprint_gguf
from detox.fusion import INTERPOLATE, FusedWrapper, Head
from detox.gguf_reader import read_gguf
from detox.resolve import resolve_calibrator
from detox.runtime import Calibrator

__all__ = [
    "DetoxLlama", "LlamaFusionProcessor", "FusionError", "llama_detokenizer", "wrap_llama", "load_llama",
    "gguf_fingerprint",
]


# ---------------------------------------------------------------------------------------------------------------
# What is read from the GGUF file: once per file (fingerprint) and once per (artifact, file) (fusion head).

_FINGERPRINTS: dict[tuple[str, int, int], TargetFingerprint] = {}
_HEADS: dict[tuple[tuple[str, int, int], str, str], Head] = {}


def _file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    p = Path(path).resolve()
    st = p.stat()
    return str(p), st.st_size, st.st_mtime_ns


def gguf_fingerprint(path: str | os.PathLike[str]) -> TargetFingerprint:
    """:func:`detox.fingerprint.fingerprint_gguf` (streamed: one row chunk in memory), memoized per file (path, size,
    mtime)."""
    key = _file_key(path)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint_gguf(path)
    return _FINGERPRINTS[key]


def _resolve(calibrator: Any, gguf_path: str | os.PathLike[str], require_signature: Any) -> tuple[Calibrator, Head]:
    """The artifact (checked against the GGUF's fingerprint) and its fusion head; the output matrix is read only for
    an interpolate head (a contrast head needs only its shape)."""
    key = _file_key(gguf_path)
    fp = gguf_fingerprint(gguf_path)
    cal = resolve_calibrator(calibrator, fp, require_signature)
    # the head depends on the alignment and, for contrast artifacts, on both calibrators' weights and the manifest's
    # fusion settings: key it on the whole manifest (it lists every file's sha256)
    manifest_sha = hashlib.sha256(cal.manifest.model_dump_json().encode()).hexdigest()
    head_key = (key, str(cal.path.resolve()), manifest_sha)
    if head_key not in _HEADS:
        if cal.fusion_mode == INTERPOLATE:
            weight = read_gguf(gguf_path).output_matrix()
        else:  # zero-stride stand-in: a contrast head reads only W_out's shape, never its values
            weight = np.broadcast_to(np.float32(0), (fp.vocab_size, fp.hidden_size))
        _HEADS[head_key] = cal.fusion_head(weight)
    return cal, _HEADS[head_key]


# ---------------------------------------------------------------------------------------------------------------
# The logits processor: a shell around the SDK's fusion step engine.


def llama_detokenizer(llama: Any) -> IncrementalDetokenizer:
    """Text of a growing ``input_ids`` exactly as ``llama.detokenize(ids)`` gives it, at the cost of the new ids.

    llama.cpp's detokenizer concatenates per-token pieces (control tokens are empty) and drops one leading space
    when the first id is BOS. A custom (e.g. Hugging Face) tokenizer need not decode piecewise: the whole sequence
    is decoded then.
    """
    from llama_cpp.llama_tokenizer import LlamaTokenizer

    if type(getattr(llama, "tokenizer_", None)) is not LlamaTokenizer:
        return IncrementalDetokenizer(
            None, whole=lambda ids: bytes(llama.detokenize(ids)).decode("utf-8", "replace").rstrip("\ufffd"))
    return IncrementalDetokenizer(lambda token: bytes(llama.detokenize([token])), strip_space_after=int(llama.token_bos()))


class FusionError(RuntimeError):
    """The fusion failed during generation (llama-cpp-python itself would ignore it and continue unfused)."""


@functools.cache
def _worker() -> ThreadPoolExecutor:
    """The one worker thread every llama.cpp fusion prefetches on, started on first use."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="detox-fusion")


class LlamaFusionProcessor(FusionEngine):
    """The step engine as a llama-cpp-python logits processor, for one generation (use a fresh one per call, as
    :class:`DetoxLlama` does); :meth:`prefetch` starts a step's calibrator work while llama.cpp decodes.

    llama-cpp-python prints and ignores exceptions raised inside processors (the step is then unfused), so the
    first error is kept in :attr:`error` and the logits pass through unchanged; :class:`DetoxLlama` raises it as
    :class:`FusionError` when the call returns.

    Example::

        >>> from llama_cpp import LogitsProcessorList  # doctest: +SKIP
        >>> proc = LlamaFusionProcessor(llama, calibrator, head, strength=0.3)  # doctest: +SKIP
        >>> llama("Hello", logits_processor=LogitsProcessorList([proc]))  # doctest: +SKIP
    """

    def __init__(self, llama: Any, calibrator: Calibrator, head: Head, strength: float | None) -> None:
        super().__init__(calibrator, head, strength, llama_detokenizer(llama), runner=calibrator.onnx_runner(),
                         executor=_worker(), one_blas_thread=True)
        self.error: BaseException | None = None

    def prefetch(self, input_ids: np.ndarray) -> None:
        if self.error is None:
            super().prefetch(np.asarray(input_ids, dtype=np.intc))

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.error is not None:
            return scores
        try:
            return self.fuse(input_ids, scores)
        except Exception as err:  # noqa: BLE001 - kept for the caller; llama-cpp-python would swallow it
            self.error = err
            return scores


def _raise_if_failed(proc: LlamaFusionProcessor) -> None:
    if proc.error is not None:
        raise FusionError(f"the calibrator fusion failed during generation: {proc.error!r}") from proc.error


class _LogitBias:
    """``logit_bias`` applied after the fusion (llama-cpp-python drops user processors when both are given)."""

    def __init__(self, bias: dict[Any, float]) -> None:
        self.ids = np.array([int(k) for k in bias], dtype=np.intp)
        self.values = np.array(list(bias.values()), dtype=np.float32)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = scores.copy()
        out[self.ids] += self.values
        return out


# ---------------------------------------------------------------------------------------------------------------
# The wrapper.


def _bound_kwargs(method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``args``/``kwargs`` of a call to ``method`` as keyword arguments (so ``logits_processor`` is found wherever it is)."""
    bound = inspect.signature(method).bind(*args, **kwargs)
    out = dict(bound.arguments)
    extra = out.pop(next((p.name for p in inspect.signature(method).parameters.values() if p.kind is p.VAR_KEYWORD), ""), {})
    out.update(extra)
    return out


class DetoxLlama(FusedWrapper):
    """A ``llama_cpp.Llama`` whose completions (``__call__``, ``create_completion``, ``create_chat_completion``,
    ``generate``; ``stream=True`` included) fuse the calibrator at every step; everything else is the Llama. The
    fusion comes first in the processor list, so user ``logits_processor`` entries and ``logit_bias`` see the fused
    logits. ``overlap`` (default on): compute each step's fusion while llama.cpp decodes (:meth:`_prefetching`).
    """

    _wrapped = "llama"
    _own_attributes = ("overlap",)

    def __init__(self, llama: Any, calibrator: Calibrator, head: Head, strength: float | None = None,
                 overlap: bool = True) -> None:
        self.__dict__.update(llama=llama, calibrator=calibrator, head=head, strength=calibrator.check_strength(strength),
                             overlap=overlap)

    def logits_processor(self) -> LlamaFusionProcessor:
        """A fresh fusion processor for one generation."""
        return LlamaFusionProcessor(self.llama, self.calibrator, self.head, self.strength)

    def _fused(self, method: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from llama_cpp import LogitsProcessorList

        kw = _bound_kwargs(method, args, kwargs)
        proc = self.logits_processor()
        processors = LogitsProcessorList([proc])
        processors.extend(kw.pop("logits_processor", None) or [])
        bias = kw.pop("logit_bias", None)
        if bias:
            processors.append(_LogitBias(bias))
        with self._prefetching(proc):
            result = method(logits_processor=processors, **kw)
        if isinstance(result, Iterator):  # stream=True (or generate): the work happens while it is consumed
            return self._consume(result, proc)
        _raise_if_failed(proc)
        return result

    def _consume(self, chunks: Iterator[Any], proc: LlamaFusionProcessor) -> Iterator[Any]:
        with self._prefetching(proc):
            for chunk in chunks:
                _raise_if_failed(proc)
                yield chunk
        _raise_if_failed(proc)

    @contextmanager
    def _prefetching(self, proc: LlamaFusionProcessor) -> Iterator[None]:
        """While generating, start each step's fusion as llama.cpp starts decoding the step's last token.

        ``Llama.eval(tokens)`` is where a sampled token is fed back; an attribute of this one instance shadows it for
        the duration of the call (removed afterwards; no module or class is touched), so the calibrator runs on a
        worker thread while llama.cpp computes the logits it is fused into. llama-cpp-python has no other hook there:
        its stopping criteria see the ids without the sampled token, and a ``draft_model`` (which does see them)
        switches the Llama to ``logits_all``.
        """
        llama = self.llama
        if not self.overlap or self.strength == 0.0 or "eval" in llama.__dict__:
            yield
            return
        decode = llama.eval

        def eval_and_prefetch(tokens: Any) -> None:
            proc.prefetch(np.concatenate([llama.input_ids[: llama.n_tokens], np.asarray(tokens, dtype=np.intc)]))
            return decode(tokens)

        llama.eval = eval_and_prefetch
        try:
            yield
        finally:
            llama.__dict__.pop("eval", None)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self._fused(self.llama.create_completion, args, kwargs)

    __call__ = create_completion

    def create_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self._fused(self.llama.create_chat_completion, args, kwargs)

    def create_chat_completion_openai_v1(self, *args: Any, **kwargs: Any) -> Any:
        # Llama's implementation calls self.create_chat_completion: run it with self = this wrapper.
        return type(self.llama).create_chat_completion_openai_v1(self, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._fused(self.llama.generate, args, kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, bool(value) if name == "overlap" else value)

    def __repr__(self) -> str:
        m = self.calibrator.manifest
        return f"DetoxLlama({Path(self.llama.model_path).name}, calibrator={m.name}@{m.version}, strength={self.strength})"


def wrap_llama(llama: Any, calibrator: Calibrator | str | os.PathLike[str] | None = None, strength: float | None = None,
               require_signature: Any = None, overlap: bool = True) -> DetoxLlama:
    """``detox.wrap`` for ``llama_cpp.Llama``: fingerprint the GGUF it was loaded from, check the artifact, wrap."""
    path = getattr(llama, "model_path", None)
    if not path or not os.path.isfile(path):
        raise ValueError(f"this Llama has no readable model file ({path!r}); detox needs the GGUF it was loaded from")
    if getattr(getattr(llama, "model_params", None), "vocab_only", False):
        raise ValueError("this Llama was loaded with vocab_only=True; load the full model to generate with detox")
    cal, head = _resolve(calibrator, path, require_signature)
    if head.vocab_size > llama.n_vocab():
        raise ArtifactError(f"the fusion head covers {head.vocab_size} tokens but the model has {llama.n_vocab()}")
    cal.onnx_runner()  # fail now, not at the first token, if the artifact has no calibrator.onnx
    return DetoxLlama(llama, cal, head, strength, overlap)


# ---------------------------------------------------------------------------------------------------------------
# Loading.


def load_llama(path: str | os.PathLike[str], extra_buffers: bool | None = None, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(path, verbose=False, **kwargs)``, optionally without llama.cpp's extra buffer types.

    ``extra_buffers=False`` turns off weight repacking (AMX / CPU-specific layouts). Some virtual machines
    advertise AMX but fault on its instructions (a segfault in ``ggml_backend_amx_mul_mat`` on the first
    decode); default: off (safe everywhere), on with ``DETOX_LLAMACPP_EXTRA_BUFFERS=1``.
    """
    import llama_cpp
    import llama_cpp.llama as llama_module

    if extra_buffers is None:
        extra_buffers = os.environ.get("DETOX_LLAMACPP_EXTRA_BUFFERS", "0") == "1"
    kwargs.setdefault("verbose", False)
    if extra_buffers:
        return llama_cpp.Llama(str(path), **kwargs)
    original = llama_module.llama_cpp.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params  # Llama() exposes no switch for this field
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        llama_module.llama_cpp.llama_model_default_params = original
