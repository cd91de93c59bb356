"""Everything ``detox serve`` knows about the backends, in one module: load a target, wrap it with
:func:`detox.wrap`, turn text and chat messages into token ids, and decode a batch of jobs token by token.

Only public pieces of the adapters are used (``wrap``/``wrap_llama``, the wrappers' ``strength`` and wrapped model,
``load_llama``, ``load_hf_target``, ``load_ort_target``), so a new step engine can replace this module alone.

* llama.cpp: one job at a time (``max_batch = 1``); ``DetoxLlama.generate`` yields tokens, the fusion included.
* transformers / ONNX Runtime: the jobs of one batch are left-padded into one ``generate`` call of the wrapped model;
  a streamer hands each step's tokens to the jobs and a stopping criterion ends each row on its own (its
  ``max_tokens``, a stop string, or its client leaving).
"""

from __future__ import annotations

import copy
import math
import os
import random
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np

from detox.fusion import check_strength
from detox.serve.engine import Choice, Job, TokenInfo, batch_key_of


def _top_info(logprobs: np.ndarray, token: int, k: int, text_of: Any) -> TokenInfo:
    """The chosen token's log-probability and the ``k`` most likely tokens (``logprobs``: one row, numpy)."""
    top: list[tuple[str, float]] = []
    if k > 0:
        idx = np.argpartition(-logprobs, k - 1)[:k]
        idx = idx[np.argsort(-logprobs[idx])]
        top = [(text_of(int(i)), float(logprobs[i])) for i in idx]
    value = float(logprobs[token])
    return TokenInfo(text_of(token), value if math.isfinite(value) else -9999.0, top)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class Backend:
    """A loaded, wrapped target that decodes jobs. Subclasses: :class:`LlamaCppBackend`, :class:`TransformersBackend`."""

    kind: str = ""
    max_batch: int = 1

    def __init__(self, fused: Any, model_id: str, context_window: int) -> None:
        self.fused = fused
        self.model_id = model_id
        self.context_window = context_window
        self.calibrator = fused.calibrator
        self.default_strength: float = fused.strength
        m = self.calibrator.manifest
        self.calibrator_label = f"{m.name}@{m.version}"

    @property
    def fusion_mode(self) -> str:
        return self.calibrator.fusion_mode

    def check_strength(self, strength: float) -> float:
        """A request's strength, validated for this artifact's fusion (ValueError with the allowed range)."""
        return check_strength(strength, self.fusion_mode)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        raise NotImplementedError

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat (the model's own chat template, with the assistant turn opened)."""
        raise NotImplementedError

    def batch_key(self, job: Job) -> Hashable:
        return batch_key_of(job)

    def run(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` (one batch) to the end, pushing every token to its :class:`Choice`; runs on the worker."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp


class _LlamaLogprobs:
    """A logits processor placed after the fusion: keeps the step's (fused) logits for ``logprobs``."""

    def __init__(self) -> None:
        self.last: np.ndarray | None = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        self.last = np.array(scores, dtype=np.float32, copy=True)
        return scores


class LlamaCppBackend(Backend):
    kind = "llamacpp"
    max_batch = 1

    def __init__(self, fused: Any, model_id: str, context_window: int) -> None:
        self.llama = fused.llama
        # llama.cpp may round its context up (llama_n_ctx); the Llama's own buffers hold what was asked for
        super().__init__(fused, model_id, min(int(context_window), int(self.llama.n_ctx())))
        self._chat = None
        template = self.llama.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos, bos = self.llama.token_eos(), self.llama.token_bos()
            text = lambda t: self.llama.detokenize([t], special=True).decode("utf-8", "replace") if t != -1 else ""  # noqa: E731
            self._chat = Jinja2ChatFormatter(template=template, eos_token=text(eos), bos_token=text(bos))
        self._pieces: dict[int, str] = {}

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids as ``Llama.create_completion`` makes them: BOS if the model adds one, special tokens parsed."""
        bos = self.llama.token_bos()
        add_bos = bool(getattr(getattr(self.llama, "_model", None), "add_bos_token", lambda: True)()) and bos != -1
        return ([bos] if add_bos else []) + self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self._chat is None:
            raise ValueError("this GGUF file has no chat template (tokenizer.chat_template); use /v1/completions")
        return self._chat(messages=messages).prompt

    def _is_end(self, token: int) -> bool:
        model = getattr(self.llama, "_model", None)
        if model is not None and hasattr(model, "vocab"):
            import llama_cpp

            return bool(llama_cpp.llama_vocab_is_eog(model.vocab, token))
        return token == self.llama.token_eos()

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.llama.detokenize([token]).decode("utf-8", "replace")
        return self._pieces[token]

    def run(self, jobs: list[Job]) -> None:
        from llama_cpp import LogitsProcessorList

        from detox.adapters.llamacpp import llama_detokenizer

        (job,) = jobs
        req = job.request
        model = self.llama
        if req.strength is not None:
            self.fused.strength = req.strength  # one generation at a time: the worker owns the wrapper
            model = self.fused
        for choice in job.choices:
            if job.cancelled.is_set():
                break
            seed = req.seed + choice.index if req.seed is not None else random.randrange(2**31)
            self.llama.set_seed(seed)
            observer = _LlamaLogprobs() if req.logprobs is not None else None
            tokens = model.generate(req.prompt_ids, top_k=0, top_p=req.top_p, min_p=0.0, temp=req.temperature,
                                    repeat_penalty=1.0,
                                    logits_processor=LogitsProcessorList([observer]) if observer else None)
            detokenize = llama_detokenizer(self.llama)
            ids: list[int] = []
            text = ""
            try:
                for token in tokens:
                    if self._is_end(token):
                        choice.finish("stop")
                        break
                    ids.append(int(token))
                    new = detokenize(np.array(ids, dtype=np.intc))
                    piece, text = new[len(text):], new
                    info = None
                    if observer is not None and observer.last is not None:
                        info = _top_info(_log_softmax(observer.last), int(token), req.logprobs or 0, self._piece)
                    if choice.push(piece, info) or job.cancelled.is_set():
                        break
            finally:
                tokens.close()  # ends llama.cpp's generation (and the fusion's prefetching) now


# ---------------------------------------------------------------------------------------------------------------
# transformers and ONNX Runtime (optimum's ORTModelForCausalLM runs transformers' generate)


class TransformersBackend(Backend):
    kind = "hf"

    def __init__(self, fused: Any, tokenizer: Any, model_id: str, context_window: int, max_batch: int = 16,
                 kind: str = "hf") -> None:
        self.kind = kind
        self.base = fused.model
        self.tokenizer = tokenizer  # the worker's (decoding)
        # the event loop's copy (encoding, chat templates): a fast tokenizer must not be used by two threads at once
        self.front = copy.deepcopy(tokenizer)
        limit = getattr(getattr(self.base, "config", None), "max_position_embeddings", None) or context_window
        super().__init__(fused, model_id, min(int(context_window), int(limit)))
        self.max_batch = max_batch
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad)
        eos = getattr(self.base.generation_config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(int(tokenizer.eos_token_id))
        self.eos_ids = sorted(set(int(e) for e in eos))

    def encode(self, text: str, chat: bool = False) -> list[int]:
        return list(self.front(text, add_special_tokens=not chat)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.front, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        return self.front.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def run(self, jobs: list[Job]) -> None:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        backend = self
        req = jobs[0].request  # every job of a batch shares the batch key: strength and sampling
        rows: list[tuple[Job, Choice]] = [(job, choice) for job in jobs for choice in job.choices]
        width = max(len(job.request.prompt_ids) for job, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (job, _) in enumerate(rows):  # left padding: every row's next token is at the same position
            ids = job.request.prompt_ids
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids):] = 1

        class Logprobs(LogitsProcessor):
            last: Any = None

            def __call__(self, ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                self.last = scores.float().log_softmax(-1).cpu().numpy()
                return scores

        observer = Logprobs() if req.logprobs is not None else None
        texts = [""] * len(rows)
        generated: list[list[int]] = [[] for _ in rows]

        class Rows(BaseStreamer):
            """Hands each step's tokens to the rows' choices (transformers calls put once with the prompt first)."""

            prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for r, token in enumerate(value.reshape(-1).tolist()):
                    choice = rows[r][1]
                    if choice.done:
                        continue
                    if token in backend.eos_ids:
                        choice.finish("stop")
                        continue
                    generated[r].append(token)
                    text = backend.tokenizer.decode(generated[r], skip_special_tokens=True)
                    piece = ""
                    if not text.endswith("\ufffd"):  # an unfinished character: wait for its next bytes
                        piece, texts[r] = text[len(texts[r]):], text
                    info = None
                    if observer is not None and observer.last is not None:
                        info = _top_info(observer.last[r], token, rows[r][0].request.logprobs or 0, backend._token_text)
                    choice.push(piece, info)

            def end(self) -> None:
                pass

        class RowsDone(StoppingCriteria):
            def __call__(self, ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
                return torch.tensor([choice.done for _, choice in rows], dtype=torch.bool, device=ids.device)

        sampled = req.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(job.request.max_tokens for job, _ in rows), do_sample=sampled, pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids, streamer=Rows(), stopping_criteria=StoppingCriteriaList([RowsDone()]),
            logits_processor=LogitsProcessorList([observer]) if observer else None, repetition_penalty=1.0,
            temperature=req.temperature if sampled else None, top_p=req.top_p if sampled else None,
            top_k=0 if sampled else None,
        )
        if sampled:
            torch.manual_seed(req.seed if req.seed is not None else random.randrange(2**31))
        model = self.base
        if req.strength is not None:
            self.fused.strength = req.strength  # one batch at a time: the worker owns the wrapper
            model = self.fused
        device = getattr(self.base, "device", torch.device("cpu"))
        with torch.inference_mode(), self._threads():
            model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)

    def _threads(self) -> Any:
        """ONNX Runtime: torch on the wrapper's thread count for the unfused model too (as ``detox bench`` does)."""
        from contextlib import nullcontext

        threads = getattr(self.fused, "torch_threads", None)
        if self.kind != "onnx" or threads is None or getattr(self.base, "device", None) is None or self.base.device.type != "cpu":
            return nullcontext()
        from detox.adapters.onnxruntime import limit_torch_threads

        return limit_torch_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def default_model_id(target: str) -> str:
    """The model name clients send: the alias as given (``smollm2``), else the file or directory name."""
    from detox.targets import SMOLLM2_ALIAS

    if target.lower() == SMOLLM2_ALIAS:
        return SMOLLM2_ALIAS
    return Path(target.rstrip("/")).name or target


def load_backend(kind: str, target: str, calibrator: str | None = None, strength: float | None = None,
                 require_signature: Sequence[str] | None = None, context_window: int = 2048,
                 max_batch: int = 16, provider: str | None = "auto", model_id: str | None = None,
                 threads: int | None = None) -> Backend:
    """Load ``target`` on ``kind`` (``llamacpp``, ``hf`` or ``onnx``) and wrap it with ``calibrator``
    (``None``: the shipped artifact aligned to it; a path; or ``NAME@RANGE`` from ``$DETOX_REGISTRY``)."""
    keys = list(require_signature) if require_signature else None
    model_id = model_id or default_model_id(target)
    if kind == "llamacpp":
        from detox.adapters.llamacpp import load_llama, wrap_llama
        from detox.targets import is_gguf, resolve_target

        path = resolve_target(target)
        if not is_gguf(path):
            raise ValueError(f"--backend llamacpp needs a .gguf file (or 'smollm2') as --target, got {target!r}")
        if not os.path.isfile(path):
            raise ValueError(f"GGUF file not found: {path}")
        kwargs: dict[str, Any] = {"n_ctx": context_window, "seed": 0}
        if threads:
            kwargs.update(n_threads=threads, n_threads_batch=threads)
        fused = wrap_llama(load_llama(path, **kwargs), calibrator=calibrator, strength=strength, require_signature=keys)
        return LlamaCppBackend(fused, model_id, context_window)
    from detox.wrapping import wrap

    if kind == "hf":
        from detox.targets import load_hf_target

        model, tokenizer = load_hf_target(target)
    elif kind == "onnx":
        from detox.adapters.onnxruntime import load_ort_target

        model, tokenizer = load_ort_target(target, provider)
    else:
        raise ValueError(f"unknown backend {kind!r}: use llamacpp, hf or onnx")
    if threads:
        import torch

        torch.set_num_threads(threads)
    tokenizer.padding_side = "left"
    fused = wrap(model, calibrator=calibrator, strength=strength, tokenizer=tokenizer, require_signature=keys)
    if kind == "hf" and threads is not None and threads < (os.cpu_count() or 1):
        fused.overlap = True  # torch leaves cores free: run the calibrator while the target computes (DetoxModel)
    return TransformersBackend(fused, tokenizer, model_id, context_window, max_batch, kind=kind)
