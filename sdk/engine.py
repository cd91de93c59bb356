"""The fusion step engine every backend's decoding step goes through (docs/architecture.md, "One decoding step").

Adapters only translate their backend's hooks to :meth:`FusionEngine.prefetch` and :meth:`FusionEngine.fuse`.
Torch is imported only for torch inputs, so the llama.cpp path stays torch-free.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import re
import warnings
import weakref
from concurrent.futures import Executor, Future
from typing import Any, Callable

import numpy as np

from detox.fusion import Head, _is_torch
from detox.stream import CalibratorStream

Array = Any  # torch.Tensor or numpy.ndarray

__all__ = ["FusionEngine", "Slot", "IncrementalDetokenizer", "transformers_detokenizer", "single_blas_thread"]


class IncrementalDetokenizer:
    """Text of a growing list of token ids exactly as the backend's whole-sequence decode gives it, at the cost of
    the new ids (``__call__(ids)``; a sequence that does not continue the previous one starts over).

    ``piece(id)`` is a token's bytes (empty for skipped special tokens; cached). The text is their concatenation
    decoded as UTF-8 (invalid bytes become U+FFFD as ``bytes.decode(errors="replace")`` does; the bytes of an
    unfinished character are held back until the rest arrives). ``strip_space_after``: drop one leading space when
    the first id is this one (llama.cpp after BOS). ``cleanup``: a whole-text rewrite whose patterns start with a
    space and span at most 4 characters (transformers' ``clean_up_tokenization``); it is re-applied only to the text
    after the last point no pattern can cross. ``whole``: decode the entire sequence instead (tokenizers whose text
    is not the concatenation of per-token bytes); exact, but it costs the whole sequence every step.
    """

    def __init__(self, piece: Callable[[int], bytes] | None, *, strip_space_after: int | None = None,
                 cleanup: Callable[[str], str] | None = None, whole: Callable[[list[int]], str] | None = None) -> None:
        if piece is None and whole is None:
            raise ValueError("an IncrementalDetokenizer needs piece= or whole=")
        self._piece_of, self._pieces = piece, {}  # the cache is shared by forks
        self.strip_space_after, self.cleanup, self.whole = strip_space_after, cleanup, whole
        self.reset()

    def reset(self) -> None:
        self.ids = np.empty(0, dtype=np.int64)
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip_space = self._seen_bytes = False
        self._raw, self._cut, self._clean_head = "", 0, ""  # cleanup: raw text, safe cut, cleaned raw[:cut]

    def fork(self) -> "IncrementalDetokenizer":
        """An independent copy (same piece cache) that continues from this text."""
        twin = object.__new__(IncrementalDetokenizer)
        twin.__dict__.update(self.__dict__)
        twin._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        twin._decoder.setstate(self._decoder.getstate())
        return twin

    def continues(self, ids: np.ndarray) -> bool:
        """Whether ``ids`` extend (or equal) the ids read so far."""
        m = len(self.ids)
        return len(ids) >= m and np.array_equal(ids[:m], self.ids)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece_of(token)
        return piece

    def __call__(self, input_ids: Any) -> str:
        ids = np.asarray(input_ids)
        if self.whole is not None:
            self.ids = ids.copy()
            self.text = self.whole(ids.tolist())
            return self.text
        if not self.continues(ids):
            self.reset()
        m = len(self.ids)
        if len(ids) == m:
            return self.text
        if m == 0:
            self._strip_space = self.strip_space_after is not None and int(ids[0]) == self.strip_space_after
        data = b"".join([self._piece(int(t)) for t in ids[m:].tolist()])
        if data and not self._seen_bytes:
            self._seen_bytes = True
            if self._strip_space and data[:1] == b" ":
                data = data[1:]
        new = self._decoder.decode(data)
        self.ids = ids.copy()
        if self.cleanup is None:
            self.text += new
            return self.text
        self._raw += new
        cut = _safe_cut(self._raw, self._cut)
        if cut > self._cut:
            self._clean_head += self.cleanup(self._raw[self._cut : cut])
            self._cut = cut
        self.text = self._clean_head + self.cleanup(self._raw[self._cut :])
        return self.text


def _safe_cut(raw: str, start: int) -> int:
    """The last index ``k ≥ start`` no cleanup pattern (a space, then at most 3 characters) can cross: the 3
    characters before ``k`` hold no space, so ``cleanup(raw) == cleanup(raw[:k]) + cleanup(raw[k:])``."""
    k = len(raw)
    while k > start:
        space = raw.rfind(" ", max(k - 3, 0), k)
        if space < 0:
            return k
        k = space
    return start


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


_DETOKENIZERS: "weakref.WeakKeyDictionary[Any, IncrementalDetokenizer]" = weakref.WeakKeyDictionary()


def transformers_detokenizer(tokenizer: Any) -> IncrementalDetokenizer:
    """The incremental equivalent of ``tokenizer.decode(ids, skip_special_tokens=True)`` for a transformers tokenizer.

    Byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3, Qwen, ...) decode to the concatenation of their tokens'
    bytes: those are decoded per token (special tokens are empty, the tokenizer's ``clean_up_tokenization`` is
    applied incrementally when it is on). Any other tokenizer decodes the whole sequence each step (exact, slower).
    """
    if tokenizer not in _DETOKENIZERS:  # reading the vocabulary takes a moment: once per tokenizer
        _DETOKENIZERS[tokenizer] = _transformers_detokenizer(tokenizer)
    return _DETOKENIZERS[tokenizer].fork()


def _transformers_detokenizer(tokenizer: Any) -> IncrementalDetokenizer:
    import json

    from transformers import PreTrainedTokenizerBase

    from detox.token_map import BYTE_DECODER  # GPT-2's byte table

    whole = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return IncrementalDetokenizer(None, whole=whole)
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder])
    kinds = [d.get("type") for d in steps]
    # a Replace step (SentencePiece's ▁ -> space) never fires on byte-level text if its pattern is not in the table
    replaces_bytes = any(d.get("type") == "Replace" and all(c in BYTE_DECODER for c in (d.get("pattern") or {}).get("String") or "?")
                         for d in steps)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = {i for i, t in added.items() if getattr(t, "special", False)}
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_level = ("ByteLevel" in kinds and set(kinds) <= {"ByteLevel", "ByteFallback", "Fuse", "Replace"} and not replaces_bytes
                  and all(i in special or (t is not None and not _BYTE_FALLBACK.fullmatch(t)
                                           and all(c in BYTE_DECODER for c in t)) for i, t in enumerate(vocab)))
    if not byte_level or any(i not in special for i in added):  # non-special added tokens decode as written
        return IncrementalDetokenizer(None, whole=whole)
    piece = lambda i: b"" if i in special else bytes(BYTE_DECODER[c] for c in vocab[i])  # noqa: E731
    cleanup = tokenizer.clean_up_tokenization if getattr(tokenizer, "clean_up_tokenization_spaces", False) else None
    if cleanup is not None and type(tokenizer).clean_up_tokenization is not PreTrainedTokenizerBase.clean_up_tokenization:
        return IncrementalDetokenizer(None, whole=whole)  # a cleanup of unknown reach: only the whole text is safe
    return IncrementalDetokenizer(piece, cleanup=cleanup)


@functools.cache
def _blas_threadpools() -> Any:
    from threadpoolctl import ThreadpoolController  # the llamacpp extra installs it

    return ThreadpoolController()  # the BLAS libraries loaded by now: numpy's OpenBLAS


def single_blas_thread() -> contextlib.AbstractContextManager:
    """Run numpy's BLAS on one thread inside ``with`` (restored after; threadpoolctl, a no-op without a BLAS).

    The fusion product is one ``vocab × d_cal`` matrix-vector product per token. Multi-threaded OpenBLAS makes it
    slower when the target's threads hold the cores (measured on 2 busy cores with llama.cpp: 20 ms with 2 threads,
    1.5 ms with one), and its idle threads spin afterwards, stealing time from the next decode.
    """
    return _blas_threadpools().limit(limits=1, user_api="blas")


@functools.cache
def _gate_scorer() -> Any:
    """The shipped scorer (ONNX Runtime, no torch), loaded once per process: engines are made per generation."""
    from detox.scoring import load_scorer

    return load_scorer(None)


def prompt_gate(threshold: float, measured_with: str | None = None,
                source: str = "the artifact") -> Callable[[str], bool]:
    """Whether a prompt gets a contrast artifact's identity exemption: its toxicity under the shipped scorer is below
    ``threshold`` (``detox align --exempt-gate``). ``measured_with``: the scorer the artifact recorded at alignment;
    another one judges prompts differently, so that is warned about (``None``: aligned before detox recorded it)."""
    from detox.scorer_base import scorer_label

    scorer = _gate_scorer()
    shipped = scorer_label(scorer.name, scorer.version)
    if measured_with is not None and measured_with != shipped:
        warnings.warn(f"{source}: its identity gate was aligned with the scorer {measured_with}, but this detox ships "
                      f"{shipped}, which may exempt other prompts; re-align it to bind the gate to this scorer: "
                      f"detox align --calibrator {source} --target MODEL --out NEW_DIR", stacklevel=3)
    return lambda text: bool(scorer.score([text])[0] < threshold)


class Slot:
    """One sequence's state: the target's text so far, the calibrator's stream over it, and whether the artifact's
    identity exemption applies to it (decided once, on the first text it reads: the prompt)."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stream: CalibratorStream) -> None:
        self.detokenizer = detokenizer
        self.stream = stream
        self.exempt: bool | None = None  # None: not decided yet, or no gate

    def fork(self) -> "Slot":
        """An independent copy (a beam that branches off); caches are shared until either side advances."""
        slot = Slot(self.detokenizer.fork(), self.stream.fork())
        slot.exempt = self.exempt
        return slot

    def output(self, ids: Any, gate: Callable[[str], bool] | None = None) -> Any:
        """The calibrator's output after reading the text of ``ids`` (what its runner gives); ``gate`` decides
        :attr:`exempt` from the first text read."""
        text = self.detokenizer(ids)
        if gate is not None and self.exempt is None:
            self.exempt = gate(text)
        return self.stream.hidden_for(text)


class FusionEngine:
    """Fuse a calibrator into a target's next-token logits, step by step, for any number of sequences.

    ``fuse(input_ids, scores)``: torch ``input_ids`` ``[batch, seq]`` with ``scores`` ``[batch, vocab]``, or one
    numpy sequence ``[seq]`` with ``scores`` ``[vocab]``; returns the fused logits (log-probabilities with
    ``renormalize``, for beam search). Rows are matched to slots by their ids (:meth:`attach`).

    Args:
        calibrator: the aligned :class:`detox.Calibrator`.
        head: its fusion head for this target (``calibrator.fusion_head(W_out)``).
        strength: λ; ``None``: the artifact's default. Checked once, here.
        detokenizer: an unused :class:`IncrementalDetokenizer` for the target; every slot gets a fork of it.
        runner: the calibrator runner (default: ``calibrator.default_runner()``); stateless, shared by all slots.
        executor: a one-worker executor for :meth:`prefetch` (``None``: no overlap).
        one_blas_thread: run the head's numpy products on one BLAS thread (:func:`single_blas_thread`).
    """

    def __init__(self, calibrator: Any, head: Head, strength: float | None, detokenizer: IncrementalDetokenizer, *,
                 runner: Any = None, renormalize: bool = False, executor: Executor | None = None,
                 one_blas_thread: bool = False) -> None:
        self.calibrator = calibrator
        self.head = head
        self.strength = calibrator.check_strength(strength)
        self.detokenizer = detokenizer
        self.runner = runner if runner is not None else calibrator.default_runner()
        self.renormalize = renormalize
        self.executor = executor
        self.slots: list[Slot] = []
        # what the runner gives -> the term the head's rule adds: the ONNX graph of a contrast pair already gives it
        self._prepare = (lambda output: output) if getattr(self.runner, "gives_log_ratio", False) else head.prepare
        self._context = single_blas_thread if one_blas_thread else contextlib.nullcontext
        self._pending: tuple[Any, Future] | None = None
        # contrast artifacts aligned with --exempt-identity --exempt-gate: whether a prompt gets the exemption
        threshold = getattr(head, "gate_threshold", None)
        self.gate: Callable[[str], bool] | None = None
        if threshold is not None:
            al = calibrator.manifest.alignment
            self.gate = prompt_gate(threshold, al.settings.get("exempt_gate_scorer") if al else None,
                                    str(getattr(calibrator, "path", "the artifact")))

    # -- slots ---------------------------------------------------------------------------------------------------

    def add(self) -> Slot:
        """A new slot (an empty text; the calibrator has read only its BOS)."""
        return Slot(self.detokenizer.fork(), self.calibrator.stream(self.runner))

    def attach(self, rows: list[np.ndarray]) -> list[Slot]:
        """Give every row a slot that has read a prefix of it: its own row's slot when that still fits (the usual
        step: one id appended), else the slot with the longest prefix (rows move under beam search; a slot claimed
        twice is forked), else a new one. Slots no row continues are dropped. Matching is by token ids, not text: a
        text prefix can end inside a word ("… the" of "… therefor"), and reading on from there mis-tokenizes."""
        previous, used, slots = self.slots, set(), []
        for i, row in enumerate(rows):
            best = i if i < len(previous) and previous[i].detokenizer.continues(row) else max(
                (j for j, slot in enumerate(previous) if slot.detokenizer.continues(row)),
                key=lambda j: len(previous[j].detokenizer.ids), default=None)
            if best is None:
                slots.append(self.add())
            elif best in used:
                slots.append(previous[best].fork())
            else:
                slots.append(previous[best])
                used.add(best)
        self.slots = slots
        return slots

    # -- one step ------------------------------------------------------------------------------------------------

    def terms(self, input_ids: Array) -> Array:
        """The fusion's part that needs no target logits, for every row of ``input_ids`` (the calibrator runs once
        per slot, over the new text only)."""
        if _is_torch(input_ids):
            import torch

            rows = input_ids.detach().cpu().numpy()
            outputs = [slot.output(row, self.gate) for slot, row in zip(self.attach(list(rows)), rows)]
            output = torch.stack([torch.as_tensor(o) for o in outputs]).to(device=self.head.device, dtype=torch.float32)
        else:  # one sequence (llama.cpp)
            output = self.attach([np.asarray(input_ids)])[0].output(input_ids, self.gate)
        with self._context():
            return self._prepare(output)

    def prefetch(self, input_ids: Array) -> None:
        """Start :meth:`terms` for ``input_ids`` on the executor (call it before the target's forward pass on them);
        :meth:`fuse` uses the result only if it is then called with exactly these ids."""
        self.discard()
        if self.executor is not None and self.strength > 0.0:
            key = input_ids.detach().clone() if _is_torch(input_ids) else np.array(input_ids)
            self._pending = (key, self.executor.submit(self.terms, key))

    def discard(self) -> None:
        """Wait for a started computation and drop it (it shares the slots)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].exception()  # waits; an error here resurfaces when the term is computed inline

    def _term_for(self, input_ids: Array) -> Array:
        pending, self._pending = self._pending, None
        if pending is not None:
            key, future = pending
            term = future.result()
            if key.shape == input_ids.shape and bool((key == input_ids).all()):
                return term
        return self.terms(input_ids)

    def fuse(self, input_ids: Array, scores: Array) -> Array:
        """The fused logits for this step (``scores`` unchanged at strength 0)."""
        if self.strength == 0.0:
            return scores
        term = self._term_for(input_ids)  # also attaches this step's slots
        if _is_torch(scores):
            term = term.to(device=scores.device, dtype=scores.dtype)
        with self._context():
            if self.gate is None:
                fused = self.head.apply(scores, term, self.strength)
            else:  # per row: the prompt gate's decision (a bool array; one sequence: a 0-d one)
                exempt = np.array([bool(slot.exempt) for slot in self.slots])
                fused = self.head.apply(scores, term, self.strength, exempt if _is_torch(scores) else exempt[0])
        if self.renormalize:
            return fused.log_softmax(-1) if _is_torch(fused) else fused - np.logaddexp.reduce(fused, -1, keepdims=True)
        return fused

