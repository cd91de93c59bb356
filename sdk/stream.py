"""Feed a growing target text to the calibrator incrementally, with its own tokenizer.

The target produces tokens; the calibrator reads the *text*, re-tokenized with its own byte-level BPE.
Pre-tokens (words with their leading space) are stable once the next one has started, so every pre-token
but the last is *committed* into the calibrator's KV cache exactly once; the last, still-growing piece is
run on top of the cache without being stored. Each target step therefore costs a few calibrator token
steps, never a re-run over the whole text.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

from tokenizers import Tokenizer


class CalibratorRunner(Protocol):
    """A backend that runs the calibrator one chunk at a time (torch, ONNX Runtime, ...)."""

    def empty_state(self) -> Any: ...

    def run(self, ids: list[int], state: Any) -> tuple[Any, Any]:
        """Return ``(hidden of the last id [d_cal], state extended by ids)``."""
        ...


class CalibratorStream:
    """The calibrator's view of one sequence; ``hidden_for(text)`` gives ``h_cal`` after reading ``text``."""

    def __init__(self, runner: CalibratorRunner, tokenizer: Tokenizer, bos_id: int) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.reset()

    def reset(self) -> None:
        self.committed_text = ""
        self.last_hidden, self.state = self.runner.run([self.bos_id], self.runner.empty_state())
        self.tokens_run = 1
        self._last_run: tuple[list[int], Any, Any] | None = None  # (ids, hidden, state) run on self.state

    def fork(self) -> "CalibratorStream":
        """A copy that can advance independently (beam search); caches are never mutated in place."""
        return copy.copy(self)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def hidden_for(self, text: str) -> Any:
        text = text.rstrip("\ufffd")  # an incomplete multi-byte character: wait for the rest
        if not text.startswith(self.committed_text):
            self.reset()
        tail = text[len(self.committed_text):]
        if not tail:
            return self.last_hidden
        pieces = self.tokenizer.pre_tokenizer.pre_tokenize_str(tail) if self.tokenizer.pre_tokenizer else [(tail, (0, len(tail)))]
        if len(pieces) > 1:
            cut = pieces[-1][1][0]
            ids = self._encode(tail[:cut])
            if ids:
                self.last_hidden, self.state = self._run(ids)
                self._last_run = None  # it was run on the old cache
            self.committed_text += tail[:cut]
            tail = tail[cut:]
        ids = self._encode(tail)
        if not ids:
            return self.last_hidden
        return self._run(ids)[0]

    def _run(self, ids: list[int]) -> tuple[Any, Any]:
        """Run ``ids`` on the committed cache. The last run is remembered: a word is first run as the growing tail,
        then committed unchanged once the next word starts, and that commit then costs no calibrator step."""
        last = self._last_run
        if last is not None and last[0] == ids:
            return last[1], last[2]
        hidden, state = self.runner.run(ids, self.state)
        self.tokens_run += len(ids)
        self._last_run = (ids, hidden, state)
        return hidden, state


class PairRunner:
    """Runs an expert and an anti-expert calibrator (same tokenizer) in lockstep for contrast fusion.

    One stream drives both, so the text is re-tokenized once; ``run`` returns both hidden states stacked as
    ``[2, d_cal]`` (expert first), the layout :meth:`detox.fusion.ContrastHead.prepare` expects.
    """

    def __init__(self, expert: CalibratorRunner, anti: CalibratorRunner) -> None:
        self.expert = expert
        self.anti = anti

    def empty_state(self) -> Any:
        return self.expert.empty_state(), self.anti.empty_state()

    def run(self, ids: list[int], state: Any) -> tuple[Any, Any]:
        h_expert, s_expert = self.expert.run(ids, state[0])
        h_anti, s_anti = self.anti.run(ids, state[1])
        if hasattr(h_expert, "detach"):
            import torch

            return torch.stack([h_expert, h_anti]), (s_expert, s_anti)
        import numpy as np

        return np.stack([h_expert, h_anti]), (s_expert, s_anti)
