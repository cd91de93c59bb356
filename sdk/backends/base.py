"""The :class:`Backend` interface: what ``detox.wrap``, ``detox generate``, ``eval``, ``bench``, ``demo`` and ``serve``
need from an inference library, so none of them branches on a backend's name (docs/architecture.md, "Backends")."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np

from detox.artifacts.manifest import TargetFingerprint

REGISTRY: dict[str, type["Backend"]] = {}


@dataclass(frozen=True)
class Sampling:
    """How one batch of rows is decoded (every row of a batch shares it)."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a random seed
    strength: float | None = None  # None: fusion off (the unwrapped target)
    logprobs: bool = False  # report each token's log-probability (and each row's top alternatives)


@dataclass
class TokenInfo:
    """A generated token with its log-probability under the (fused) distribution it was sampled from."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


class Row(Protocol):
    """One output sequence a backend decodes token by token (``detox serve``'s ``Choice``)."""

    index: int  # the row's number within its request (seeds ``seed + index`` where rows are decoded one by one)
    prompt_ids: list[int]
    top_logprobs: int  # how many alternatives to report per token (with ``Sampling.logprobs``)

    @property
    def done(self) -> bool: ...

    def push(self, piece: str, info: TokenInfo | None = None) -> bool: ...

    def finish(self, reason: str) -> bool: ...


class Backend:
    """A target loaded on one inference library: ``model`` (unwrapped) and ``fused`` (``None`` until :meth:`wrap`);
    sampling methods take ``fused=`` to pick one. A subclass sets ``name`` and implements the methods that raise
    ``NotImplementedError``; defining it registers it."""

    name: ClassVar[str] = ""
    supports: ClassVar[str] = ""  # what detox.wrap accepts, in words (for its error message)
    batched: ClassVar[bool] = False  # decode() takes several rows at once
    model_class: ClassVar[tuple[str, str]] = ("", "")  # (module, class) of the models detox.wrap hands to it

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, model: Any, tokenizer: Any = None, source: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source  # the file or directory the target was loaded from, if known
        self.fused: Any = None

    # -- what every backend implements ------------------------------------------------------------------------

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """True if ``model`` is an instance of :attr:`model_class`. Never imports the backend's library: a model of
        that class exists only if its module was imported already."""
        module_name, class_name = cls.model_class
        module = sys.modules.get(module_name)
        return module is not None and isinstance(model, getattr(module, class_name, ()))

    @classmethod
    def load(cls, target: str, *, context_window: int = 2048, seed: int = 0, threads: int | None = None,
             provider: str | None = None) -> "Backend":
        """Load ``target`` (a path, or an alias such as ``smollm2``) offline."""
        raise NotImplementedError

    def fingerprint(self) -> TargetFingerprint:
        """The target's fingerprint (what an aligned calibrator is bound to)."""
        raise NotImplementedError

    def wrap(self, calibrator: Any = None, strength: float | None = None, require_signature: Any = None) -> Any:
        """Fuse ``calibrator`` (see :func:`detox.wrap`) into the target; sets and returns :attr:`fused`."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        raise NotImplementedError

    def sample(self, prompts: list[str], num_samples: int, max_new_tokens: int, top_p: float, seed: int,
               fused: bool = True) -> list[list[str]]:
        """``[i][k]``: the k-th nucleus-sampled continuation (text only) of ``prompts[i]``, reproducible from ``seed``
        (``detox eval``, ``detox demo``)."""
        raise NotImplementedError

    def generate(self, prompt: str, max_new_tokens: int, sample: bool, top_p: float, temperature: float, seed: int,
                 echo: Callable[[str], None], fused: bool = True) -> str:
        """One continuation of ``prompt`` (``detox generate``), passed to ``echo`` (in pieces where it streams)."""
        raise NotImplementedError

    def bench_runner(self, prompt: str, tokens: int, fused: bool) -> Callable[[], int]:
        """A call that greedily decodes exactly ``tokens`` new tokens after ``prompt`` and returns that count."""
        raise NotImplementedError

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text`` as the backend's own completion call makes them (``chat``: a rendered chat)."""
        raise NotImplementedError

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat (the model's own chat template, with the assistant turn opened)."""
        raise NotImplementedError

    def transformers_twin(self, fallback: str | None = None) -> tuple[Any, Any]:
        """``(transformers model, tokenizer)`` of this target, to score text with (``detox eval``'s perplexity and
        ``--reference-text``); ``fallback``: what to load where the target has no transformers form."""
        raise NotImplementedError

    @classmethod
    def perplexity_problem(cls) -> str | None:
        """Why :meth:`transformers_twin` cannot score perplexity here without a ``fallback`` (checked before the
        target loads); ``None`` if it can."""
        return None

    def context_limit(self) -> int | None:
        """The most tokens (prompt + completion) the loaded model takes, if it says."""
        return None

    def decode(self, rows: Sequence[Row], sampling: Sampling) -> None:
        """Decode ``rows`` (one batch; one row unless :attr:`batched`) to the end, pushing every token to its row."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------------

    def runner(self, fused: bool = True, strength: float | None = None) -> Any:
        """The wrapped target (``fused``; set to ``strength`` if given) or the unwrapped one."""
        if fused and self.fused is None:
            raise RuntimeError("this target is not wrapped: call wrap() first")
        if fused and strength is not None:
            self.fused.strength = strength  # one batch at a time: the caller (serve's worker) owns the wrapper
        return self.fused if fused else self.model


class LastScores:
    """A logits processor placed after the fusion: keeps each step's (fused) scores, as ``keep`` converts them, for
    ``logprobs`` (a transformers and a llama-cpp-python processor alike)."""

    def __init__(self, keep: Callable[[Any], np.ndarray]) -> None:
        self.keep = keep
        self.last: np.ndarray | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.last = self.keep(scores)
        return scores


def top_info(logprobs: np.ndarray, token: int, k: int, text_of: Callable[[int], str]) -> TokenInfo:
    """The chosen token's log-probability and the ``k`` most likely tokens (``logprobs``: one row, numpy)."""
    top: list[tuple[str, float]] = []
    if k > 0:
        idx = np.argpartition(-logprobs, k - 1)[:k]
        idx = idx[np.argsort(-logprobs[idx])]
        top = [(text_of(int(i)), float(logprobs[i])) for i in idx]
    value = float(logprobs[token])
    return TokenInfo(text_of(token), value if math.isfinite(value) else -9999.0, top)
