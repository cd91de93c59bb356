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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

Array = Any  # torch.Tensor or numpy.ndarray


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

    @classmethod
    def build(cls, W_out: Array, A: Array, ln_weight: Array, ln_bias: Array, eps: float = 1e-5) -> "FusionHead":
        """Precompute ``P``, ``g``, ``b`` from the target's output embedding ``W_out`` ([vocab, d_target])."""
        if W_out.shape[1] != A.shape[1]:
            raise ValueError(f"alignment maps into width {A.shape[1]} but the target's hidden size is {W_out.shape[1]}")
        P = (W_out * ln_weight[None, :]) @ A.T
        return cls(A=A, P=P, g=W_out @ ln_weight, b=W_out @ ln_bias, eps=eps)

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


def check_strength(strength: float) -> float:
    """λ as a float in [0, 1]; every place that accepts a strength validates it here."""
    value = float(strength)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"fusion strength must be in [0, 1], got {strength}")
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
            self.__dict__["strength"] = check_strength(value)
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
