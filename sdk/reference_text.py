"""How likely is human-written text under the fused distribution, compared with the unfused target?

A detoxifier that assigns lower likelihood to benign text about identity groups (or to a dialect) marginalizes it
(Xu et al. 2021). :func:`score_reference_texts` scores every token of each text alone and fused, token by token as
generation fuses (the same :class:`~detox.adapters.transformers.FusionLogitsProcessor`, fed each prefix); what each
perplexity means (``unfused``, ``fused_untruncated``, ``support``, ``*_in_support``) is in docs/identity.md.
Nucleus (top-p) truncation is left out on both sides. At λ = 0 every ratio is exactly 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from detox.data import DataFormatError, read_texts
from detox.fusion import Head
from detox.methods.contrast import ContrastHead


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The non-empty lines of a text file, one text per line (:func:`detox.data.read_texts`), refusing none."""
    texts = read_texts(path)
    if not texts:
        raise DataFormatError(f"{path}: no text lines; expected one text per line")
    return texts


def untruncated_logits(head: Head, logits: torch.Tensor, prepared: torch.Tensor, strength: float) -> torch.Tensor:
    """The fusion rule on every token of the vocabulary: ``z + λ·r`` for contrast heads (no candidate truncation),
    the head's own fused logits for interpolation; λ = 0 returns ``z`` unchanged."""
    if strength == 0.0:
        return logits * 1.0
    if not isinstance(head, ContrastHead):
        return head.apply(logits, prepared, strength)
    v = head.vocab_size
    idx = torch.arange(v, device=logits.device).expand(*logits.shape[:-1], v)
    out = logits * 1.0
    out[..., :v] = logits[..., :v] + strength * head.ratio_at(prepared, idx)
    return out


def token_log_probs(head: Head, logits: torch.Tensor, prepared: torch.Tensor, next_ids: torch.Tensor,
                    strength: float) -> dict[str, torch.Tensor]:
    """Per position ``t`` the log-probabilities of ``next_ids[t]`` (module docstring), from the target's logits
    ``[T, V]`` and :meth:`Head.prepare`'s output ``[T, ...]`` at each position."""
    logits = logits.float()
    fused = head.apply(logits, prepared, strength)
    support = torch.isfinite(fused)
    col = next_ids[:, None]

    def at(x: torch.Tensor) -> torch.Tensor:
        return x.log_softmax(-1).gather(-1, col)[:, 0]

    in_support = support.gather(-1, col)[:, 0]
    return {
        "unfused": at(logits),
        "fused_untruncated": at(untruncated_logits(head, logits, prepared, strength)),
        "support": in_support,
        "fused_in_support": at(fused),
        "unfused_in_support": at(logits.masked_fill(~support, float("-inf"))),
    }


def _ppl(logps: list[float]) -> float:
    return math.exp(-sum(logps) / len(logps)) if logps else float("nan")


@dataclass
class ReferenceScore:
    """Token-weighted perplexities of a set of texts, fused against unfused (module docstring)."""

    texts: int
    tokens: int
    strength: float
    perplexity_unfused: float
    perplexity_fused_untruncated: float
    support_share: float
    tokens_in_support: int
    perplexity_unfused_in_support: float
    perplexity_fused_in_support: float

    @property
    def ratio_untruncated(self) -> float:
        return self.perplexity_fused_untruncated / self.perplexity_unfused

    @property
    def ratio_in_support(self) -> float:
        return self.perplexity_fused_in_support / self.perplexity_unfused_in_support

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ratio_untruncated": self.ratio_untruncated, "ratio_in_support": self.ratio_in_support}

    def markdown(self, name: str = "reference text") -> str:
        return (f"\n{name}: {self.texts} texts, {self.tokens} tokens, strength {self.strength:g}\n\n"
                "| per-token perplexity | unfused | fused | fused / unfused |\n|---|---|---|---|\n"
                f"| all tokens, fusion rule without truncation | {self.perplexity_unfused:.2f} | "
                f"{self.perplexity_fused_untruncated:.2f} | {self.ratio_untruncated:.3f} |\n"
                f"| tokens the sampled distribution can produce ({self.support_share:.1%}), sampled distribution | "
                f"{self.perplexity_unfused_in_support:.2f} | {self.perplexity_fused_in_support:.2f} | {self.ratio_in_support:.3f} |\n")


def _ids_with_context(tokenizer: Any, text: str) -> list[int]:
    """The text's ids, led by a BOS (or EOS) token when the tokenizer adds none, so its first token is scored too."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    lead = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if lead is not None and (not ids or ids[0] != lead):
        ids = [lead] + ids
    return ids


def score_ids(proc: Any, model: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`token_log_probs` of tokens ``ids[0, 1:]`` (``ids``: ``[1, T]``), the fusion term of each prefix from the
    :class:`~detox.adapters.transformers.FusionLogitsProcessor` ``proc``, as generation computes it."""
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1].float()
        prepared = torch.cat([proc.fusion_term(ids[:, : t + 1]) for t in range(ids.shape[1] - 1)])
    return token_log_probs(proc.head, logits, prepared.to(logits.device), ids[0, 1:].to(logits.device), proc.strength)


def score_reference_texts(fused: Any, texts: Sequence[str], progress: bool = True) -> ReferenceScore:
    """Score ``texts`` under a transformers model wrapped by ``detox.wrap`` (``fused``), at its strength, and under
    the model alone. The calibrator sees each prefix as text, exactly as during generation."""
    from tqdm.auto import tqdm

    from detox.adapters.transformers import FusionLogitsProcessor

    model, tokenizer, lam = fused.model, fused.tokenizer, fused.strength
    proc = FusionLogitsProcessor(fused.calibrator, model, tokenizer, lam)
    sums: dict[str, list[float]] = {k: [] for k in ("unfused", "fused_untruncated", "fused_in_support", "unfused_in_support")}
    n_tokens = n_support = 0
    for text in tqdm(texts, desc="reference text", unit="text", disable=not progress):
        ids = torch.tensor([_ids_with_context(tokenizer, text)])
        if ids.shape[1] < 2:
            continue
        lp = score_ids(proc, model, ids)
        s = lp["support"]
        n_tokens += int(s.numel())
        n_support += int(s.sum())
        for key in ("unfused", "fused_untruncated"):
            sums[key] += lp[key].tolist()
        for key in ("fused_in_support", "unfused_in_support"):
            sums[key] += lp[key][s].tolist()
    if n_tokens == 0:
        raise ValueError("no reference text had a token to score")
    return ReferenceScore(texts=len(texts), tokens=n_tokens, strength=lam, support_share=n_support / n_tokens,
                          tokens_in_support=n_support, **{f"perplexity_{k}": _ppl(v) for k, v in sums.items()})


def eval_reference_text(path: str | os.PathLike[str], texts: Sequence[str], model: Any, tokenizer: Any,
                        calibrator: str | None, strength: float | None, progress: bool = True) -> dict[str, Any]:
    """``detox eval --reference-text``: ``texts`` (the lines of ``path``) scored with ``model`` (transformers) fused
    with the run's calibrator (path; ``None``: the shipped one) and alone; a JSON-ready dict for ``summary.json``."""
    import detox

    fused = detox.wrap(model, calibrator=calibrator, strength=strength, tokenizer=tokenizer)
    return {**score_reference_texts(fused, texts, progress).as_dict(), "file": str(Path(path).resolve())}

