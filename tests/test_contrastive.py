"""The contrastive step against an independent (numpy, probability-space) computation on fixed logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detox.contrastive import contrastive_logits, plausibility_mask, sample, top_p_filter


pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = torch.tensor(
    [
        [3.0, 2.5, 1.0, 0.0, -1.0, 2.9, -4.0, 0.5],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [10.0, -2.0, 9.0, 7.7, 1.0, 8.0, 3.0, -9.0],
    ]
)
TOXIC = torch.tensor(
    [
        [1.0, 4.0, 0.0, 2.0, 0.0, -3.0, 1.0, 0.0],
        [2.0, -1.0, 0.5, 0.0, 3.0, 1.0, -2.0, 0.0],
        [9.0, 0.0, 12.0, 5.0, 1.0, 6.0, 2.0, 0.0],
    ]
)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _expected(base: torch.Tensor, toxic: torch.Tensor, alpha: float, beta: float) -> np.ndarray:
    """The formula written out in probability space, in float64, without the module's code path."""
    pb, pt = _softmax(base.double().numpy()), _softmax(toxic.double().numpy())
    keep = pb >= alpha * pb.max(axis=-1, keepdims=True)
    if math.isinf(beta):
        s = np.log(pb / pt)
    else:
        s = (1 + beta) * np.log(pb) - beta * np.log(pt)
    return np.where(keep, s, -np.inf)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.1, 0.5, 0.9, 1.0])
def test_mask_matches_probability_definition(alpha: float) -> None:
    pb = _softmax(BASE.double().numpy())
    expected = pb >= alpha * pb.max(axis=-1, keepdims=True)
    got = plausibility_mask(BASE, alpha).numpy()
    assert (got == expected).all()
    assert got[np.arange(3), BASE.argmax(-1).numpy()].all()  # the argmax is always plausible


def test_mask_on_fixed_logits_by_hand() -> None:
    # row 0: p_v / p_max = exp(l_v - 3): kept for alpha=0.5 iff l_v >= 3 + ln 0.5 = 2.307 -> tokens 0, 1, 5
    assert plausibility_mask(BASE, 0.5)[0].nonzero().flatten().tolist() == [0, 1, 5]
    # uniform row: everything ties with the max
    assert plausibility_mask(BASE, 1.0)[1].all()
    # the authors' code compares raw logits with log(alpha) + max logit: same set
    raw = BASE >= math.log(0.1) + BASE.max(-1, keepdim=True).values
    assert torch.equal(raw, plausibility_mask(BASE, 0.1))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 4.0, float("inf")])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5])
def test_contrastive_matches_formula(alpha: float, beta: float) -> None:
    got = contrastive_logits(BASE, TOXIC, alpha=alpha, beta=beta).double().numpy()
    exp = _expected(BASE, TOXIC, alpha, beta)
    assert (np.isinf(got) == np.isinf(exp)).all()
    finite = np.isfinite(exp)
    np.testing.assert_allclose(got[finite], exp[finite], rtol=1e-5, atol=1e-4)


def test_beta_inf_is_base_minus_toxic_logits_up_to_a_row_constant() -> None:
    got = contrastive_logits(BASE, TOXIC, alpha=0.1)
    raw = (BASE - TOXIC).masked_fill(~plausibility_mask(BASE, 0.1), float("-inf"))
    # same sampling distribution as the code's raw-logit difference, which differs by one constant per row
    torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(raw, -1))
    finite = torch.isfinite(got)
    for r in range(BASE.shape[0]):
        d = (got[r] - raw[r])[finite[r]]
        assert torch.allclose(d, d[0].expand_as(d), atol=1e-4)


def test_beta_zero_is_base_logprobs_and_ignores_toxic() -> None:
    a = contrastive_logits(BASE, TOXIC, alpha=0.1, beta=0.0)
    b = contrastive_logits(BASE, -5 * TOXIC, alpha=0.1, beta=0.0)
    assert torch.equal(a, b)
    mask = plausibility_mask(BASE, 0.1)
    torch.testing.assert_close(a[mask], torch.log_softmax(BASE, -1)[mask])


def test_inputs_not_modified_and_bad_args() -> None:
    base, toxic = BASE.clone(), TOXIC.clone()
    contrastive_logits(base, toxic)
    assert torch.equal(base, BASE) and torch.equal(toxic, TOXIC)
    with pytest.raises(ValueError, match="shape"):
        contrastive_logits(BASE, TOXIC[:, :5])
    with pytest.raises(ValueError, match="alpha"):
        contrastive_logits(BASE, TOXIC, alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        contrastive_logits(BASE, TOXIC, beta=-1.0)


def test_toxic_zero_probability_stays_finite() -> None:
    toxic = TOXIC.clone()
    toxic[0, 0] = float("-inf")
    s = contrastive_logits(BASE, toxic, alpha=0.1)
    assert torch.isfinite(s[0, 0])
    assert torch.isfinite(torch.softmax(s, -1)).all()


def test_beta_zero_samples_only_the_plausible_set_with_base_proportions() -> None:
    alpha = 0.3
    scores = contrastive_logits(BASE[:1], TOXIC[:1], alpha=alpha, beta=0.0).expand(4000, -1)
    draws = sample(scores, [torch.Generator().manual_seed(i) for i in range(4000)])
    allowed = set(plausibility_mask(BASE[:1], alpha)[0].nonzero().flatten().tolist())
    assert set(draws.tolist()) == allowed  # support is exactly the plausible set
    pb = _softmax(BASE[0].double().numpy())
    idx = sorted(allowed)
    target = pb[idx] / pb[idx].sum()
    freq = np.array([(draws == i).float().mean().item() for i in idx])
    np.testing.assert_allclose(freq, target, atol=0.03)


def test_top_p_and_per_row_generators() -> None:
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # p = .644 .237 .087 .032
    assert torch.isinf(top_p_filter(s, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(s, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.equal(top_p_filter(s, 1.0), s)
    # a row's draw does not depend on the other rows of the batch
    scores = torch.log_softmax(TOXIC, -1)
    full = sample(scores, [torch.Generator().manual_seed(k) for k in (7, 8, 9)])
    alone = sample(scores[2:], [torch.Generator().manual_seed(9)])
    assert full[2] == alone[0]
    assert sample(scores, None, temperature=0).tolist() == TOXIC.argmax(-1).tolist()
