"""The incremental calibrator stream equals a full re-run over the calibrator's tokenization of the text."""

import torch

from detox.runtime import Calibrator


def _full_hidden(cal: Calibrator, text: str) -> torch.Tensor:
    ids = [cal.manifest.calibrator.bos_token_id] + cal.tokenizer.encode(text, add_special_tokens=False).ids
    with torch.inference_mode():
        hidden, _ = cal.torch_model()(torch.tensor([ids]))
    return hidden[0, -1]


def test_stream_matches_full_recompute_at_every_step(tiny_calibrator):
    cal = Calibrator.load(tiny_calibrator)
    stream = cal.stream()
    text = "The weather  today is lovely, isn't it? We walked 12 km along the river"
    # grow the text a few characters at a time, as a target emits tokens
    cuts = list(range(1, len(text) + 1, 3)) + [len(text)]
    for c in cuts:
        torch.testing.assert_close(stream.hidden_for(text[:c]), _full_hidden(cal, text[:c]), atol=1e-4, rtol=1e-4)
    # committed work is proportional to the text, not quadratic: each token is committed once
    assert stream.tokens_run < 3 * len(cal.tokenizer.encode(text).ids) + 2 * len(cuts)


def test_stream_resets_when_text_is_not_a_continuation(tiny_calibrator):
    cal = Calibrator.load(tiny_calibrator)
    stream = cal.stream()
    stream.hidden_for("Hello there my good friend")
    got = stream.hidden_for("Completely different text")
    torch.testing.assert_close(got, _full_hidden(cal, "Completely different text"), atol=1e-4, rtol=1e-4)


def test_incomplete_multibyte_character_is_ignored(tiny_calibrator):
    cal = Calibrator.load(tiny_calibrator)
    stream = cal.stream()
    torch.testing.assert_close(stream.hidden_for("caf\ufffd"), _full_hidden(cal, "caf"), atol=1e-4, rtol=1e-4)


def test_committing_a_word_already_run_as_the_tail_costs_no_calibrator_step(tiny_calibrator):
    """Word by word, every calibrator token is computed once: the commit reuses the tail run of the step before."""
    cal = Calibrator.load(tiny_calibrator)
    stream = cal.stream()
    words = "The weather today is lovely and we walked along the river".split(" ")
    for i in range(1, len(words) + 1):
        text = " ".join(words[:i])
        torch.testing.assert_close(stream.hidden_for(text), _full_hidden(cal, text), atol=1e-4, rtol=1e-4)
    assert stream.tokens_run == 1 + len(cal.tokenizer.encode(" ".join(words), add_special_tokens=False).ids)
