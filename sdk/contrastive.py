"""Contrastive decoding between a base LM and a toxic LM (UniDetox), written once for the whole SDK.

``scores(v) = (1 + beta) * log p_base(v) - beta * log p_toxic(v)`` on the tokens with ``p_base(v) >= alpha * max
p_base`` (the adaptive plausibility constraint), ``-inf`` elsewhere; ``beta = inf`` is ``log p_base - log p_toxic``.
docs/unidetox.md maps the letters to the paper and the authors' code and explains why this works on log-probabilities
(same mask and sampling distribution as raw logits, but scores that mean the same for every model).
"""

from __future__ import annotations

import math

import torch

from detox.fusion import top_candidates

# A toxic log-probability of -inf (a token the toxic model rules out completely) would give +inf / NaN scores;
# clamp it to a floor far below any real log-probability (e**-1e4 is 0 in float32) so the scores stay finite.
_TOXIC_LOGP_FLOOR = -1e4


def plausibility_mask(base_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Boolean ``[batch, vocab]`` mask, True where ``p_base(v) >= alpha * max p_base`` (the tokens kept).

    The rule the fused decoder applies to the target (:func:`detox.fusion.top_candidates`, over the whole vocabulary
    here): ``log p >= log(alpha) + max log p`` on ``log_softmax`` in float32; the argmax is always kept.
    """
    if not (0.0 <= float(alpha) <= 1.0) or math.isnan(alpha):
        raise ValueError(f"alpha must be in [0, 1] (plausibility threshold, UniDetox default 0.1); got {alpha}")
    logp = torch.log_softmax(base_logits.float(), dim=-1)
    idx, keep = top_candidates(logp, logp.shape[-1], alpha)
    return torch.zeros_like(keep).scatter(-1, idx, keep)


def contrastive_logits(
    base_logits: torch.Tensor,
    toxic_logits: torch.Tensor,
    alpha: float = 0.1,
    beta: float = float("inf"),
) -> torch.Tensor:
    """UniDetox's contrastive scores ``[batch, vocab]`` (float32); tokens outside the plausible set are -inf.

    Inside the set: ``(1+beta)*log p_base - beta*log p_toxic``; ``beta=inf`` gives ``log p_base - log p_toxic``
    and ``beta=0`` gives ``log p_base``. Feed the result to ``softmax`` / :func:`sample` to draw a token.
    Inputs are not modified.
    """
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"beta must be >= 0 or inf (contrast strength, UniDetox default inf); got {beta}")
    if base_logits.shape != toxic_logits.shape:
        raise ValueError(
            f"base and toxic logits differ in shape ({tuple(base_logits.shape)} vs {tuple(toxic_logits.shape)}); "
            "both models must share one tokenizer and vocabulary size"
        )
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    mask = plausibility_mask(base_logits, alpha)
    if beta == 0:
        scores = base_logp
    else:
        toxic_logp = torch.log_softmax(toxic_logits.float(), dim=-1).clamp_min(_TOXIC_LOGP_FLOOR)
        if math.isinf(beta):
            scores = base_logp - toxic_logp
        else:
            scores = (1.0 + beta) * base_logp - beta * toxic_logp
    return scores.masked_fill(~mask, float("-inf"))


def top_p_filter(scores: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability under ``softmax(scores)`` reaches ``top_p`` (nucleus)."""
    if top_p is None or top_p >= 1.0:
        return scores
    if not 0.0 < top_p < 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
    # drop a token when the mass *before* it already reaches top_p (so the top token is always kept)
    drop_sorted = (cum - torch.softmax(sorted_scores, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def sample(
    scores: torch.Tensor,
    generators: list[torch.Generator],
    temperature: float = 1.0,
    top_p: float | None = None,
) -> torch.Tensor:
    """Draw one token id per row from ``softmax(scores / temperature)`` after nucleus filtering.

    One ``torch.Generator`` per row makes each row's draw independent of the other rows in the batch
    (so a resumed or re-batched run draws the same tokens). ``temperature=0`` is greedy.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    if temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(top_p_filter(scores.float() / temperature, top_p), dim=-1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
