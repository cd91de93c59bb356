"""llama.cpp backend (``llama-cpp-python``): the calibrator fused into a ``Llama``'s logits at every step, no torch.

llama-cpp-python exposes only next-token logits to Python (``logits_processor(input_ids, scores)``), so the
fusion runs on logits: ``(1 − λ)·scores + λ·W_out·LayerNorm(h_cal·A)`` with ``W_out`` read from the GGUF file
and the product precomputed once per (artifact, GGUF) as :class:`~detox.fusion.FusionHead`. The calibrator runs
from the artifact's ``calibrator.onnx`` with ONNX Runtime, reading the target's text incrementally (its own
tokenizer and KV cache), so this module imports numpy, onnxruntime, tokenizers and llama_cpp — never torch.

Example::

    >>> from llama_cpp import Llama  # doctest: +SKIP
    >>> import detox
    >>> llm = detox.wrap(Llama("SmolLM2-135M-Instruct.Q4_1.gguf", verbose=False), calibrator="aligned-smollm2")  # doctest: +SKIP
    >>> llm("The weather today is", max_tokens=20, temperature=0.0)["choices"][0]["text"]  # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import hashlib
import inspect
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from detox.artifacts.manifest import TargetFingerprint
from detox.artifacts.store import ArtifactError
from detox.fusion import FusedWrapper, Head, prepare_term
from detox.methods import check_strength
from detox.runtime import Calibrator

__all__ = [
    "DetoxLlama", "LlamaFusionProcessor", "FusionError", "IncrementalDetokenizer", "wrap_llama", "load_llama",
    "gguf_fingerprint", "clear_caches",
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
    from detox.fingerprint import fingerprint_gguf

    key = _file_key(path)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint_gguf(path)
    return _FINGERPRINTS[key]


def _resolve(calibrator: Any, gguf_path: str | os.PathLike[str], require_signature: Any) -> tuple[Calibrator, Head]:
    """The artifact (checked against the GGUF's fingerprint) and its fusion head; the output matrix is read only for
    an interpolate head (a contrast head needs only its shape)."""
    from detox.fusion import INTERPOLATE
    from detox.resolve import resolve_calibrator

    key = _file_key(gguf_path)
    fp = gguf_fingerprint(gguf_path)
    cal = resolve_calibrator(calibrator, fp, require_signature)
    # the head depends on the alignment and, for contrast artifacts, on both calibrators' weights and the manifest's
    # fusion settings: key it on the whole manifest (it lists every file's sha256)
    manifest_sha = hashlib.sha256(cal.manifest.model_dump_json().encode()).hexdigest()
    head_key = (key, str(cal.path.resolve()), manifest_sha)
    if head_key not in _HEADS:
        if cal.fusion_mode == INTERPOLATE:
            from detox.gguf_reader import read_gguf

            weight = read_gguf(gguf_path).output_matrix()
        else:  # zero-stride stand-in: a contrast head reads only W_out's shape, never its values
            weight = np.broadcast_to(np.float32(0), (fp.vocab_size, fp.hidden_size))
        _HEADS[head_key] = cal.fusion_head(weight)
    return cal, _HEADS[head_key]


def clear_caches() -> None:
    """Forget memoized GGUF fingerprints and fusion heads (each head holds a ``vocab × d_cal`` float32 matrix)."""
    _FINGERPRINTS.clear()
    _HEADS.clear()


# ---------------------------------------------------------------------------------------------------------------
# The logits processor.


class _OneBlasThread:
    """Run numpy's BLAS on one thread inside ``with`` (restored after); a no-op if no OpenBLAS is found.

    The fusion product is one ``vocab × d_cal`` matrix-vector product per token. Multi-threaded OpenBLAS makes it
    slower when llama.cpp's threads hold the cores (measured on 2 busy cores: 20 ms with 2 threads, 1.5 ms with
    one), and its idle threads spin afterwards, stealing time from the next llama.cpp decode.
    """

    _fns: tuple[Any, Any] | None | bool = False  # False: not looked up yet; None: not found

    @classmethod
    def _lookup(cls) -> tuple[Any, Any] | None:
        import ctypes
        import glob

        paths: list[str] = []
        try:
            with open("/proc/self/maps", encoding="utf-8") as maps:  # libraries numpy already loaded (Linux)
                paths += sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
        except OSError:
            pass
        libs_dir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
        paths += glob.glob(os.path.join(libs_dir, "*openblas*"))
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"), ("openblas_", "")):
                get, set_ = (getattr(lib, f"{prefix}{op}_num_threads{suffix}", None) for op in ("get", "set"))
                if get is not None and set_ is not None:
                    set_.argtypes = [ctypes.c_int]
                    return get, set_
        return None

    def __enter__(self) -> None:
        if _OneBlasThread._fns is False:
            _OneBlasThread._fns = self._lookup()
        fns = _OneBlasThread._fns
        self._old = None
        if fns:
            self._old = int(fns[0]())
            if self._old != 1:
                fns[1](1)

    def __exit__(self, *exc: Any) -> None:
        fns = _OneBlasThread._fns
        if fns and self._old not in (None, 1):
            fns[1](self._old)


class IncrementalDetokenizer:
    """Text of a growing ``input_ids`` exactly as ``llama.detokenize(ids)`` would give it, at the cost of the new ids.

    llama.cpp's detokenizer concatenates per-token pieces (control tokens are empty) and drops one leading space
    when the first id is BOS; pieces are cached per id. Bytes of an unfinished UTF-8 character are held back
    until the rest arrives (invalid bytes become U+FFFD, as ``bytes.decode(errors="replace")`` does).
    """

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self.bos = int(llama.token_bos())
        # A custom (e.g. Hugging Face) tokenizer need not decode piecewise: decode the whole sequence then.
        from llama_cpp.llama_tokenizer import LlamaTokenizer

        self.piecewise = type(getattr(llama, "tokenizer_", None)) is LlamaTokenizer
        self._pieces: dict[int, bytes] = {}
        self.reset()

    def reset(self) -> None:
        self.ids = np.empty(0, dtype=np.intc)
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip_space = False
        self._seen_bytes = False

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = bytes(self.llama.detokenize([token]))
        return piece

    def __call__(self, input_ids: np.ndarray) -> str:
        n, m = len(input_ids), len(self.ids)
        if not self.piecewise:
            self.ids = np.array(input_ids, dtype=np.intc)
            return bytes(self.llama.detokenize(self.ids.tolist())).decode("utf-8", "replace").rstrip("\ufffd")
        if n < m or not np.array_equal(input_ids[:m], self.ids):
            self.reset()
            m = 0
        if n == m:
            return self.text
        if m == 0:
            self._strip_space = int(input_ids[0]) == self.bos
        data = b"".join([self._piece(int(t)) for t in input_ids[m:]])
        if data and not self._seen_bytes:
            self._seen_bytes = True
            if self._strip_space and data[:1] == b" ":
                data = data[1:]
        self.text += self._decoder.decode(data)
        self.ids = np.array(input_ids, dtype=np.intc)
        return self.text


class FusionError(RuntimeError):
    """The fusion failed during generation (llama-cpp-python itself would ignore it and continue unfused)."""


_WORKER: ThreadPoolExecutor | None = None


def _worker() -> ThreadPoolExecutor:
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detox-fusion")
    return _WORKER


class LlamaFusionProcessor:
    """A llama-cpp-python logits processor: ``(1 − λ)·scores + λ·W_out·LayerNorm(h_cal·A)``.

    One instance follows one generation (it keeps the calibrator's cache and the decoded text); a sequence that
    does not continue the previous one starts the calibrator over. Use a fresh one per call, as
    :class:`DetoxLlama` does.

    :meth:`prefetch` lets the fusion term of the next step be computed on a worker thread while llama.cpp decodes
    (it releases the GIL); ``__call__`` then only waits for it and interpolates. Every step is computed exactly.

    llama-cpp-python prints and ignores exceptions raised inside processors (the step is then unfused), so the
    first error is kept in :attr:`error` and the logits pass through unchanged; :class:`DetoxLlama` raises it as
    :class:`FusionError` when the call returns.

    Example::

        >>> from llama_cpp import LogitsProcessorList  # doctest: +SKIP
        >>> proc = LlamaFusionProcessor(llama, calibrator, head, strength=0.3)  # doctest: +SKIP
        >>> llama("Hello", logits_processor=LogitsProcessorList([proc]))  # doctest: +SKIP
    """

    def __init__(self, llama: Any, calibrator: Calibrator, head: Head, strength: float) -> None:
        self.strength = check_strength(strength, head.mode)
        self.head = head
        self.detokenize = IncrementalDetokenizer(llama)
        self.stream = calibrator.stream(calibrator.onnx_runner())
        self.error: BaseException | None = None
        self._one_blas_thread = _OneBlasThread()
        self._pending: tuple[np.ndarray, Future[np.ndarray]] | None = None

    def fusion_term(self, input_ids: np.ndarray) -> np.ndarray:
        """The fusion's part that needs no logits (:meth:`FusionHead.prepare`) after reading the text of ``input_ids``."""
        output = self.stream.hidden_for(self.detokenize(input_ids))
        with self._one_blas_thread:
            return prepare_term(self.head, output, self.stream.runner)

    def prefetch(self, input_ids: np.ndarray) -> None:
        """Start computing the term for ``input_ids`` in the background (call it before the target decodes them)."""
        if self.strength == 0.0 or self.error is not None:
            return
        try:
            self._take()  # one at a time: computations share the calibrator's cache
            ids = np.array(input_ids, dtype=np.intc)
            self._pending = (ids, _worker().submit(self.fusion_term, ids))
        except Exception as err:  # noqa: BLE001 - reported by the wrapper like errors inside __call__
            self.error = err

    def _take(self) -> tuple[np.ndarray, np.ndarray] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending[0], pending[1].result()

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.strength == 0.0 or self.error is not None:
            return scores
        try:
            ready = self._take()
            term = ready[1] if ready is not None and np.array_equal(ready[0], input_ids) else self.fusion_term(input_ids)
            with self._one_blas_thread:
                return self.head.apply(scores, term, self.strength)
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
    """A ``llama_cpp.Llama`` whose completions fuse the calibrator at every step; everything else is the Llama.

    ``__call__``, ``create_completion``, ``create_chat_completion`` (and its OpenAI-typed variant) and
    ``generate`` accept the same arguments as on the Llama, ``stream=True`` included. The fusion comes first in
    the processor list, so user ``logits_processor`` entries and ``logit_bias`` see the fused logits, as the
    transformers adapter does. Unknown attributes are forwarded to the wrapped Llama.

    ``overlap`` (default on): compute each step's fusion on a worker thread while llama.cpp decodes the previous
    token (see :meth:`_prefetching`); off, it runs inside the logits processor, after the decode.
    """

    _wrapped = "llama"
    _own_attributes = ("overlap",)

    def __init__(self, llama: Any, calibrator: Calibrator, head: Head, strength: float | None = None,
                 overlap: bool = True) -> None:
        strength = check_strength(calibrator.default_strength if strength is None else strength, head.mode)
        self.__dict__.update(llama=llama, calibrator=calibrator, head=head, strength=strength, overlap=overlap)

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

        ``Llama.eval(tokens)`` is where a sampled token is fed back; an instance attribute shadows it for the
        duration of the call (restored afterwards), so the calibrator and the fusion product run on a worker thread
        while llama.cpp computes the logits they are fused into.
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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fused(self.llama.create_completion, args, kwargs)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self._fused(self.llama.create_completion, args, kwargs)

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
