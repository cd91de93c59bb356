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

That is the ``interpolate`` method (:mod:`detox.methods.interpolate`). The default shipped artifact uses the second,
``contrast`` (:mod:`detox.methods.contrast`): an *expert* calibrator
(clean text: UniDetox-distilled since 3.0.0) and an *anti-expert* (the expert fine-tuned on toxic text), read in their own vocabulary and
mapped to the target's tokens by text; on the target's plausible tokens::

    fused[v] = logits_target[v] + λ · min(0, log p_expert(v) − log p_anti(v))        (−inf elsewhere)

(``suppress_only``; without it the log-ratio is added as is). It never flattens the target's distribution the way
``(1 − λ)`` does. See docs/method.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol

Array = Any  # torch.Tensor or numpy.ndarray


INTERPOLATE = "interpolate"  # the paper's (1 − λ)·target + λ·calibrator: detox.methods.interpolate
CONTRAST = "contrast"  # expert/anti-expert: target + λ·(expert − anti-expert), detox.methods.contrast


class Head(Protocol):
    """What a fusion method's head (``Calibrator.fusion_head``) gives every backend: the part of the fusion that
    needs no target logits (:meth:`prepare`, overlapped with the target's step) and the fused logits (:meth:`apply`)."""

    mode: str  # the fusion method's name

    @property
    def vocab_size(self) -> int: ...

    @property
    def device(self) -> Any: ...

    def prepare(self, hidden: Array) -> Array: ...

    def apply(self, logits: Array, prepared: Array, strength: float) -> Array: ...


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
            self.__dict__["strength"] = self.__dict__["calibrator"].check_strength(value)
        elif name in self._own_attributes:
            self.__dict__[name] = value
        elif name in self.__dict__:  # calibrator, tokenizer, head, the wrapped model: fixed when wrapping
            raise AttributeError(
                f"{type(self).__name__}.{name} is set when wrapping and cannot be replaced (the fusion head and the "
                f"alignment check depend on it); wrap the original model again: "
                f"detox.wrap(wrapped.{self._wrapped}, calibrator=..., strength=...)"
            )
        else:
            setattr(self.__dict__[self._wrapped], name, value)


def fuse_logits(logits: Array, term: Array, strength: float) -> Array:
    """``(1 − λ)·logits + λ·term`` over the first ``term.shape[-1]`` entries; extra (padding) logits are kept.

    Never mutates ``logits``; strength 0 returns the input values exactly. λ is the caller's to validate
    (:meth:`detox.methods.base.MethodConfig.check_strength`).
    """
    strength = float(strength)
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


def log_softmax(x: Array) -> Array:
    if _is_torch(x):
        return x.log_softmax(-1)
    import numpy as np

    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def pair_log_ratio(hidden: Array, expert_out: Array, anti_out: Array) -> Array:
    """``log p_expert − log p_anti`` over the calibrator vocabulary (``[..., vocab_cal]``) from the stacked states
    ``[..., 2, d_cal]`` (expert first) and the two models' tied output embeddings ``[vocab_cal, d_cal]``."""
    return log_softmax(hidden[..., 0, :] @ expert_out.T) - log_softmax(hidden[..., 1, :] @ anti_out.T)


def contrast_fuse(logits: Array, idx: Array, keep: Array, log_ratio: Array, strength: float) -> Array:
    """``logits[v] + λ·log_ratio[v]`` on the target's plausible candidates ``idx[keep]``, ``-inf`` elsewhere.

    ``idx``/``keep`` come from :func:`top_candidates`, ``log_ratio`` (``[..., k]``) is ``log p_expert − log p_anti``
    at those candidates. Never mutates ``logits``; λ is the caller's to validate.
    """
    strength = float(strength)
    if _is_torch(logits):
        import torch

        vals = (logits.gather(-1, idx) + strength * log_ratio).masked_fill(~keep, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(-1, idx, vals)
    import numpy as np

    vals = np.where(keep, np.take_along_axis(logits, idx, -1) + strength * log_ratio, -np.inf).astype(logits.dtype, copy=False)
    out = np.full_like(logits, -np.inf)
    np.put_along_axis(out, idx, vals, -1)
    return out
