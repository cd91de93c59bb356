"""The fusion math in detox.fusion against an independent computation of the paper's hidden-state form."""

import numpy as np
import pytest
import torch

from detox.fusion import fuse_logits
from detox.methods.interpolate import FusionHead


def _random_case(seed=0, vocab=50, d_t=12, d_c=8):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(vocab, d_t, generator=g),  # W_out
        torch.randn(d_c, d_t, generator=g),  # A
        torch.randn(d_t, generator=g),  # ln weight
        torch.randn(d_t, generator=g),  # ln bias
        torch.randn(3, d_c, generator=g),  # h_cal
        torch.randn(3, d_t, generator=g),  # h_target
    )


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.6, 1.0])
def test_logit_form_equals_hidden_interpolation(strength):
    W, A, gamma, beta, h_cal, h_t = _random_case()
    # the paper's form: interpolate hidden states, then the LM head
    h = (1 - strength) * h_t + strength * torch.nn.functional.layer_norm(h_cal @ A, (A.shape[1],), gamma, beta, 1e-5)
    expected = h @ W.T
    head = FusionHead.build(W, A, gamma, beta, eps=1e-5)
    got = fuse_logits(h_t @ W.T, head.term(h_cal), strength)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_numpy_and_torch_agree():
    W, A, gamma, beta, h_cal, _ = _random_case(1)
    t = FusionHead.build(W, A, gamma, beta).term(h_cal)
    n = FusionHead.build(W.numpy(), A.numpy(), gamma.numpy(), beta.numpy()).term(h_cal.numpy())
    assert isinstance(n, np.ndarray)
    np.testing.assert_allclose(n, t.numpy(), atol=1e-4, rtol=1e-4)


def test_strength_zero_is_exact_and_input_not_mutated():
    logits = torch.randn(2, 50)
    before = logits.clone()
    out = fuse_logits(logits, torch.full((2, 50), 1e3), 0.0)
    assert torch.equal(out, before) and torch.equal(logits, before)
    fuse_logits(logits, torch.randn(2, 50), 0.5)
    assert torch.equal(logits, before)


def test_padded_logits_keep_their_tail():
    logits = torch.randn(1, 55)
    term = torch.randn(1, 50)
    out = fuse_logits(logits, term, 0.5)
    torch.testing.assert_close(out[:, :50], 0.5 * logits[:, :50] + 0.5 * term)
    assert torch.equal(out[:, 50:], logits[:, 50:])


def test_bad_inputs_are_refused():
    W, A, gamma, beta, *_ = _random_case()
    with pytest.raises(ValueError, match=r"strength for interpolate fusion must be in \[0, 1\]"):
        FusionHead.build(W, A, gamma, beta).apply(torch.zeros(1, 50), torch.zeros(1, 50), 1.5)
    with pytest.raises(ValueError, match="hidden size"):
        FusionHead.build(W[:, :5], A, gamma, beta)
    with pytest.raises(ValueError, match="logits"):
        fuse_logits(torch.zeros(1, 40), torch.zeros(1, 50), 0.5)
