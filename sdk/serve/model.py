"""The served model: a :class:`detox.backends.Backend`, loaded and wrapped, plus what the server adds (the model id
clients send, the context window, how many rows a batch may hold) and the step from queued jobs to the backend's
:meth:`~detox.backends.Backend.decode`.

llama.cpp's backend decodes one request at a time (``max_batch = 1``); transformers and ONNX Runtime decode the
jobs of one batch as one left-padded ``generate`` call, each row ending on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from detox.backends import Backend, Sampling, get
from detox.serve.engine import Job
from detox.targets import SMOLLM2_ALIAS


class ServedModel:
    """A loaded, wrapped target as the server sees it; its worker thread calls :meth:`run`."""

    def __init__(self, backend: Backend, model_id: str, context_window: int, max_batch: int = 16) -> None:
        self.backend = backend
        self.kind = backend.name
        self.model_id = model_id
        limit = backend.context_limit()
        self.context_window = min(int(context_window), int(limit)) if limit else int(context_window)
        self.max_batch = max_batch if backend.batched else 1
        self.calibrator = backend.fused.calibrator
        self.default_strength: float = backend.fused.strength
        self.fusion_mode: str = self.calibrator.fusion_mode
        m = self.calibrator.manifest
        self.calibrator_label = f"{m.name}@{m.version}"
        # a request's strength, validated for this artifact's fusion (ValueError with the allowed range)
        self.check_strength = self.calibrator.check_strength
        self.encode, self.render_chat = backend.encode, backend.render_chat

    def run(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` (one batch: they share a batch key, so strength and sampling) to the end."""
        req = jobs[0].request
        sampling = Sampling(max_new_tokens=max(job.request.max_tokens for job in jobs), temperature=req.temperature,
                            top_p=req.top_p, seed=req.seed, strength=req.strength, logprobs=req.logprobs is not None)
        self.backend.decode([choice for job in jobs for choice in job.choices], sampling)


def default_model_id(target: str) -> str:
    """The model name clients send: the alias as given (``smollm2``), else the file or directory name."""
    if target.lower() == SMOLLM2_ALIAS:
        return SMOLLM2_ALIAS
    return Path(target.rstrip("/")).name or target


def load_backend(kind: str, target: str, calibrator: str | None = None, strength: float | None = None,
                 require_signature: Sequence[str] | None = None, context_window: int = 2048,
                 max_batch: int = 16, provider: str | None = "auto", model_id: str | None = None,
                 threads: int | None = None) -> ServedModel:
    """Load ``target`` on backend ``kind`` (``llamacpp``, ``hf``, ``onnx``, ...) and wrap it with ``calibrator``
    (``None``: the shipped artifact aligned to it; a path; or ``NAME@RANGE`` from ``$DETOX_REGISTRY``)."""
    backend: Any = get(kind).load(target, context_window=context_window, seed=0, threads=threads, provider=provider)
    fused = backend.wrap(calibrator, strength, list(require_signature) if require_signature else None)
    if threads is not None and threads < (os.cpu_count() or 1):
        # cores left free: run the calibrator while the target computes (hf's default is off; on transformers only
        # for batches of two or more rows, a single row's calibrator step runs inline: docs/serve.md)
        fused.overlap = True
    return ServedModel(backend, model_id or default_model_id(target), context_window, max_batch)
