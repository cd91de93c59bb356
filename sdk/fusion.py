"""The fusion math, written once for every backend (torch tensors and numpy arrays alike).

The paper's form interpolates hidden states right before the target's LM head::

    h = (1 - λ) · h_target + λ · LayerNorm(h_cal · A)        logits = W_out · h

Because the LM head is linear this equals, on logits alone,

    fused = (1 - λ) · logits_target + λ · W_out · LayerNorm(h_cal · A)

and with ``x = h_cal · A``, ``μ``/``σ`` its mean/std over the target width, and the LayerNorm's ``γ``, ``β``::

    W_out · LayerNorm(x) = (P · h_cal − μ · g) / σ + b,   P = W_out · diag(γ) · Aᵀ,  g = W_out · γ,  b = W_out · β

``P`` ([vocab, d_cal]), ``g`` and ``b`` are precomputed once per target, so each step costs one
``vocab × d_cal`` product instead of a second full LM head — and backends that only expose logits
(llama.cpp) can fuse too. Functions here use only operators that torch and numpy share.

The default shipped artifact uses the second mode, ``contrast``: an *expert* calibrator (non-toxic text) and an
*anti-expert* (the expert fine-tuned on toxic text) share one alignment, and on the target's plausible tokens::

    fused[v] = logits_target[v] + λ · (term_expert[v] − term_anti[v])        (−inf elsewhere)

It only needs the ``top_k`` candidate rows of ``P`` (``k × d_cal`` work per step) and never flattens the target's
distribution the way ``(1 − λ)`` does. See :func:`contrast_fuse` and docs/method.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

Array = Any  # torch.Tensor or numpy.ndarray


INTERPOLATE = "interpolate"  # the paper's (1 − λ)·target + λ·calibrator
CONTRAST = "contrast"  # expert/anti-expert: target + λ·(expert − anti-expert) on the target's plausible tokens
MAX_STRENGTH = {INTERPOLATE: 1.0, CONTRAST: 20.0}


def _mean_last(x: Array) -> Array:
    return x.mean(-1)[..., None]


@dataclass
class FusionHead:
    """Precomputed per-target pieces of ``W_out · LayerNorm(h_cal · A)``."""

    A: Array  # [d_cal, d_target]
    P: Array  # [vocab, d_cal]
    g: Array  # [vocab]
    b: Array  # [vocab]
    eps: float
    mode: str = "interpolate"  # INTERPOLATE or CONTRAST (expert/anti-expert pair)
    top_k: int = 64  # CONTRAST: at most this many of the target's tokens are candidates ...
    plausibility: float = 0.02  # ... those with p ≥ plausibility · max p

    @classmethod
    def build(cls, W_out: Array, A: Array, ln_weight: Array, ln_bias: Array, eps: float = 1e-5, **rule: Any) -> "FusionHead":
        """Precompute ``P``, ``g``, ``b`` from the target's output embedding ``W_out`` ([vocab, d_target]).

        ``rule``: ``mode``, ``top_k``, ``plausibility`` (see the fields)."""
        if W_out.shape[1] != A.shape[1]:
            raise ValueError(f"alignment maps into width {A.shape[1]} but the target's hidden size is {W_out.shape[1]}")
        if rule.get("mode", INTERPOLATE) not in MAX_STRENGTH:
            raise ValueError(f"unknown fusion mode {rule['mode']!r}; use {' or '.join(MAX_STRENGTH)}")
        P = (W_out * ln_weight[None, :]) @ A.T
        return cls(A=A, P=P, g=W_out @ ln_weight, b=W_out @ ln_bias, eps=eps, **rule)

    def prepare(self, hidden: Array) -> Array:
        """What can be computed before the target's logits are known (backends overlap it with the target's step):
        the whole term for INTERPOLATE (``hidden``: ``[..., d_cal]``); the calibrator states themselves for CONTRAST
        (``hidden``: ``[..., 2, d_cal]``, expert then anti-expert), whose work depends on the target's candidates."""
        return self.term(hidden) if self.mode == INTERPOLATE else hidden

    def apply(self, logits: Array, prepared: Array, strength: float) -> Array:
        """The fused logits for this head's mode from :meth:`prepare`'s output; never mutates ``logits``."""
        if self.mode == INTERPOLATE:
            return fuse_logits(logits, prepared, strength)
        if check_strength(strength, CONTRAST) == 0.0:
            return logits * 1.0
        idx, keep = top_candidates(logits[..., : self.vocab_size], self.top_k, self.plausibility)
        expert = self.term_at(prepared[..., 0, :], idx)
        anti = self.term_at(prepared[..., 1, :], idx)
        return contrast_fuse(logits, idx, keep, expert, anti, strength)

    @property
    def vocab_size(self) -> int:
        return int(self.P.shape[0])

    def term(self, h_cal: Array) -> Array:
        """``W_out · LayerNorm(h_cal · A)`` for ``h_cal`` of shape ``[..., d_cal]``; returns ``[..., vocab]``."""
        x = h_cal @ self.A
        mu = _mean_last(x)
        var = _mean_last((x - mu) ** 2)
        inv_std = (var + self.eps) ** -0.5
        return (h_cal @ self.P.T - mu * self.g) * inv_std + self.b


    def term_at(self, h_cal: Array, idx: Array) -> Array:
        """:meth:`term` for the vocabulary ids ``idx`` only (``[..., k]``): ``k × d_cal`` work instead of ``vocab × d_cal``."""
        x = h_cal @ self.A
        mu = _mean_last(x)
        var = _mean_last((x - mu) ** 2)
        inv_std = (var + self.eps) ** -0.5
        dot = (self.P[idx] * h_cal[..., None, :]).sum(-1)
        return (dot - mu * self.g[idx]) * inv_std + self.b[idx]


def check_strength(strength: float, mode: str = INTERPOLATE) -> float:
    """λ as a float in the range of the fusion ``mode``; every place that accepts a strength validates it here."""
    value = float(strength)
    top = MAX_STRENGTH[mode]
    if not 0.0 <= value <= top:
        raise ValueError(f"fusion strength for {mode} fusion must be in [0, {top:g}], got {strength}")
    return value


class FusedWrapper:
    """What every backend's wrapper shares: a validated ``strength``, ``disable_fusion``, and attribute forwarding
    to the wrapped object (named by ``_wrapped``). Torch-free, so the llama.cpp path can use it."""

    _wrapped = "model"
    _own_attributes: tuple[str, ...] = ()

    @contextmanager
    def disable_fusion(self) -> Iterator[None]:
        """Temporarily generate without the calibrator (strength 0)."""
        old = self.__dict__["strength"]
        self.__dict__["strength"] = 0.0
        try:
            yield
        finally:
            self.__dict__["strength"] = old

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__[self._wrapped], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "strength":
            self.__dict__["strength"] = check_strength(value, self.__dict__["calibrator"].fusion_mode)
        elif name in self._own_attributes:
            self.__dict__[name] = value
        else:
            setattr(self.__dict__[self._wrapped], name, value)


def fuse_logits(logits: Array, term: Array, strength: float) -> Array:
    """``(1 − λ)·logits + λ·term`` over the first ``term.shape[-1]`` entries; extra (padding) logits are kept.

    Never mutates ``logits``; strength 0 returns the input values exactly.
    """
    strength = check_strength(strength)
    if strength == 0.0:
        return logits * 1.0
    v = term.shape[-1]
    if logits.shape[-1] == v:
        return (1.0 - strength) * logits + strength * term
    if logits.shape[-1] < v:
        raise ValueError(f"target produced {logits.shape[-1]} logits but the fusion head covers {v} tokens")
    out = logits * 1.0
    out[..., :v] = (1.0 - strength) * logits[..., :v] + strength * term
    return out


def _is_torch(x: Array) -> bool:
    return hasattr(x, "detach")


def top_candidates(logits: Array, top_k: int, plausibility: float) -> tuple[Array, Array]:
    """The target's plausible next tokens: ids of its ``top_k`` largest logits (``[..., k]``) and a mask of those
    with ``p(v) ≥ plausibility · max p`` (UniDetox's adaptive plausibility constraint, here on the target)."""
    import math

    k = min(int(top_k), logits.shape[-1])
    if _is_torch(logits):
        vals, idx = logits.topk(k, dim=-1)
        top = vals.amax(-1, keepdim=True)
    else:
        import numpy as np

        idx = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
        vals = np.take_along_axis(logits, idx, -1)
        top = vals.max(-1, keepdims=True)
    keep = vals >= top + math.log(plausibility) if plausibility > 0 else vals > -float("inf")
    return idx, keep


def contrast_fuse(logits: Array, idx: Array, keep: Array, expert_term: Array, anti_term: Array, strength: float) -> Array:
    """Expert/anti-expert fusion on the target's plausible tokens, ``-inf`` elsewhere::

        fused[v] = logits[v] + λ · (term_expert[v] − term_anti[v])   for v in the plausible set

    i.e. ``p ∝ p_target · (p_expert / p_anti)^λ`` restricted to what the target finds plausible (DExperts'
    ensemble on a truncated base). Unlike the paper's interpolation it never flattens the target's own
    distribution, and it only ever reorders tokens the target would plausibly say, which bounds the fluency cost.
    ``idx``/``keep`` come from :func:`top_candidates`; the terms are ``FusionHead.term_at(h, idx)`` of each calibrator.
    """
    strength = check_strength(strength, CONTRAST)
    if _is_torch(logits):
        import torch

        vals = logits.gather(-1, idx) + strength * (expert_term - anti_term)
        vals = vals.masked_fill(~keep, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(-1, idx, vals)
    import numpy as np

    vals = np.take_along_axis(logits, idx, -1) + strength * (expert_term - anti_term)
    vals = np.where(keep, vals, -np.inf).astype(logits.dtype, copy=False)
    out = np.full_like(logits, -np.inf)
    np.put_along_axis(out, idx, vals, -1)
    return out
