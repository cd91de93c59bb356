"""transformers: a ``LogitsProcessor`` shell around :class:`detox.engine.FusionEngine`, and a thin wrapper whose
``generate`` adds it (sampling, beams, padded batches and streamers included); the ONNX Runtime backend uses both."""

from __future__ import annotations

import functools
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from detox.engine import FusionEngine, transformers_detokenizer
from detox.fingerprint import hash_vocab
from detox.fusion import FusedWrapper, Head
from detox.gguf_reader import GGUFError, read_gguf
from detox.runtime import Calibrator
from detox.stream import CalibratorRunner


class FusionLogitsProcessor(FusionEngine, LogitsProcessor):
    r"""The step engine as a transformers ``LogitsProcessor``: fuses an aligned calibrator into every row's logits.

    Example::

        >>> proc = FusionLogitsProcessor(calibrator, model, tokenizer, strength=0.3)  # doctest: +SKIP
        >>> model.generate(**inputs, logits_processor=LogitsProcessorList([proc]))  # doctest: +SKIP

    ``model``: the target, whose output embedding builds the fusion head, or ``None`` with ``head=`` (ONNX Runtime
    reads ``W_out`` from its graph). ``tokenizer``: the target's, to read ``input_ids`` back as text.
    ``renormalize``: return log-probabilities (beam search). ``runner``: the calibrator runner (default:
    ``calibrator.default_runner()``). ``executor``: a one-worker executor for :meth:`prefetch`.
    """

    def __init__(self, calibrator: Calibrator, model: Any, tokenizer: Any, strength: float | None = None,
                 renormalize: bool = False, *, head: Head | None = None, runner: CalibratorRunner | None = None,
                 executor: ThreadPoolExecutor | None = None) -> None:
        if head is None:
            if model is None:
                raise ValueError("pass the target model (its output embedding builds the fusion head) or head=")
            head = calibrator.fusion_head(model.get_output_embeddings().weight)
        super().__init__(calibrator, head, strength, transformers_detokenizer(tokenizer), runner=runner,
                         renormalize=renormalize, executor=executor)
        self.tokenizer = tokenizer

    fusion_term = FusionEngine.terms  # every row's part of the fusion that needs no target logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.fuse(input_ids, scores)


class _PrefetchNextStep(StoppingCriteria):
    """Never stops generation: it is the hook that starts the next step's fusion term.

    transformers' decoding loop has no callback between appending a token and the next forward pass other than its
    stopping criteria (streamers get only the new tokens, logits processors run after the forward pass), so this
    criterion, called with the full ``input_ids`` right there, is where the overlap starts.
    """

    def __init__(self, processor: FusionLogitsProcessor) -> None:
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.processor.prefetch(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextmanager
def limit_torch_threads(n: int | None) -> Iterator[None]:
    """Run with torch's intra-op pool at ``n`` threads (``None``: unchanged), restoring it afterwards."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class DetoxModel(FusedWrapper):
    """A transformers causal LM whose ``generate`` applies the fusion; everything else is the wrapped model.

    ``overlap``: run each step's calibrator work on a worker thread during the target's forward pass (not under beam
    search; same generations either way). Off by default: torch's OpenMP threads already keep every core busy, and
    on 2 cores it was as often slower as faster (docs/benchmarks.md); turn it on when torch has fewer threads than
    there are cores; it then applies to batches of two or more sequences (``_overlap_one_row``).
    ``head``, ``runner``: built by the backend (default: from the model's output embedding,
    ``calibrator.default_runner()``); ``torch_threads``: torch's threads during ``generate`` on CPU.
    """

    _own_attributes = ("overlap", "torch_threads")  # settings of the wrapper, not of the wrapped model
    # Overlap a single sequence too? Not on a torch target: its eager forward pass is ~1000 operator calls from Python,
    # each handing the GIL back, and a worker thread that holds it in between (tokenizing, stepping the stream) made
    # one-row steps slower than running the calibrator inline (docs/serve.md); from two rows on, overlap pays.
    _overlap_one_row = False

    def __init__(self, model: Any, calibrator: Calibrator, tokenizer: Any, strength: float | None = None,
                 overlap: bool = False, *, head: Head | None = None, runner: CalibratorRunner | None = None,
                 torch_threads: int | None = None) -> None:
        self.__dict__.update(model=model, calibrator=calibrator, tokenizer=tokenizer, overlap=overlap, head=head,
                             runner=runner, torch_threads=torch_threads, strength=calibrator.check_strength(strength))

    @functools.cached_property
    def _worker(self) -> ThreadPoolExecutor:
        """One worker thread per wrapped model, started on first use."""
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="detox-fusion")

    def fusion_head(self) -> Head:
        """The fusion head for the wrapped model's output embedding, built once and rebuilt only when that embedding
        is replaced, moved or changed in place: building it converts the calibrator's float16 output matrices, ≈ 16 ms
        that every ``generate`` call (every ``detox serve`` request) used to pay."""
        weight = self.model.get_output_embeddings().weight
        try:
            version = weight._version  # bumped by in-place updates (an optimizer step)
        except RuntimeError:  # an inference-mode tensor: it cannot be updated in place
            version = None
        key = (weight.device, weight.dtype, tuple(weight.shape), weight.data_ptr(), version)
        cached = self.__dict__.get("_head")
        if cached is None or cached[0]() is not weight or cached[1] != key:
            self.__dict__["_head"] = cached = (weakref.ref(weight), key, self.calibrator.fusion_head(weight))
        return cached[2]

    def logits_processor(self, num_beams: int = 1) -> FusionLogitsProcessor:
        head = self.head if self.head is not None else self.fusion_head()  # ONNX Runtime's comes from its graph
        return FusionLogitsProcessor(self.calibrator, None, self.tokenizer, self.strength, renormalize=num_beams > 1,
                                     head=head, runner=self.runner, executor=self._worker)

    def generate(self, *args: Any, logits_processor: LogitsProcessorList | None = None, **kwargs: Any) -> Any:
        gen_cfg = kwargs.get("generation_config") or self.model.generation_config
        num_beams = kwargs.get("num_beams") or getattr(gen_cfg, "num_beams", 1) or 1
        fusion = self.logits_processor(num_beams)
        processors = LogitsProcessorList([fusion])
        processors.extend(logits_processor or [])
        ids = kwargs.get("input_ids", args[0] if args else None)  # does this call decode a single sequence?
        one_row = getattr(ids, "ndim", 0) == 2 and int(ids.shape[0]) * int(kwargs.get("num_return_sequences") or 1) == 1
        if self.overlap and num_beams == 1 and fusion.strength > 0 and (self._overlap_one_row or not one_row):
            kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []),
                                                                _PrefetchNextStep(fusion)])
        threads = self.torch_threads if self.torch_threads and fusion.head.device.type == "cpu" else None
        try:
            with limit_torch_threads(threads):
                return self.model.generate(*args, logits_processor=processors, **kwargs)
        finally:
            fusion.discard()  # the step after the last one is never run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        m = self.calibrator.manifest
        return f"{type(self).__name__}({type(self.model).__name__}, calibrator={m.name}@{m.version}, strength={self.strength})"


def load_tokenizer_for(model: Any) -> Any:
    """The tokenizer a transformers model was saved with, found offline the way transformers loads it.

    transformers records only where a model came from (``model.name_or_path``: a directory or a hub id); this looks
    there: a directory's tokenizer files, else the hub's local cache (the snapshot the model was loaded from), and,
    for models loaded from a GGUF (``from_pretrained(dir, gguf_file=...)``, which is not recorded), the tokenizer
    inside the directory's GGUF files whose vocabulary has the model's size. Nothing is downloaded.
    Raises ``ValueError`` naming what was searched and the ``tokenizer=`` argument to pass instead.
    """
    from transformers import AutoTokenizer

    source = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not source:
        raise ValueError(_no_tokenizer_message(model, "", "the model records no path (it was not loaded with from_pretrained)"))
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError/ValueError/TypeError/...: try the GGUF files
        first_error = err
    folder = source if os.path.isdir(source) else _cached_snapshot(source, getattr(model.config, "_commit_hash", None))
    if folder is None:
        why = (str(first_error).splitlines() or [type(first_error).__name__])[0]
        raise ValueError(_no_tokenizer_message(model, source, why)) from first_error
    ggufs = _gguf_tokenizer_candidates(folder, int(model.get_output_embeddings().weight.shape[0]))
    if len(ggufs) == 1:
        return AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0], local_files_only=True)
    why = (f"{folder} has GGUF files of different vocabularies of this size ({', '.join(ggufs)}): which one is unknown"
           if ggufs else f"{folder} has neither tokenizer files nor a GGUF file with a vocabulary of this model's size")
    raise ValueError(_no_tokenizer_message(model, source, why)) from first_error


def _cached_snapshot(repo_id: str, revision: str | None) -> str | None:
    """The local hub-cache folder of ``repo_id`` (the revision the model was loaded from), or ``None``."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a repo id, or not in the cache
        return None


def _gguf_tokenizer_candidates(folder: str, vocab_size: int) -> list[str]:
    """Names of the GGUF files in ``folder`` whose vocabulary has ``vocab_size`` tokens, one per distinct vocabulary
    (quantizations of one model share a tokenizer, so any of them will do)."""
    by_vocab: dict[str, str] = {}
    for path in sorted(Path(folder).glob("*.gguf")):
        try:
            tokens = read_gguf(path).tokens()
        except (GGUFError, OSError):  # not a readable GGUF: not a candidate
            continue
        if len(tokens) == vocab_size:
            by_vocab.setdefault(hash_vocab(tokens), path.name)
    return sorted(by_vocab.values())


def _no_tokenizer_message(model: Any, source: str, why: str) -> str:
    where = source or "PATH_OR_HUB_ID"
    gguf = ", gguf_file=NAME.gguf" if source and os.path.isdir(source) and any(Path(source).glob("*.gguf")) else ""
    return (f"could not find the tokenizer of this {type(model).__name__} ({source or 'no path recorded'}): {why}. "
            f"Pass it: detox.wrap(model, tokenizer=AutoTokenizer.from_pretrained({where!r}{gguf}))")
