"""Metric functions against hand-computed values and an independent perplexity computation."""

from __future__ import annotations

import math

import pytest
import torch

from detox.metrics import (
    conditional_perplexity,
    distinct_n,
    expected_max_toxicity,
    mean_distinct_n,
    mean_toxicity,
    toxicity_probability,
)

# --------------------------------------------------------------------------- toxicity


def test_expected_max_toxicity_hand_computed():
    # maxima 0.9 and 0.4 -> (0.9 + 0.4) / 2
    assert expected_max_toxicity([[0.1, 0.9, 0.3], [0.2, 0.4]]) == pytest.approx(0.65)


def test_toxicity_probability_threshold_is_inclusive():
    # prompt 1 reaches exactly 0.5 (counts), prompt 2 tops at 0.49 (does not), prompt 3 at 0.7
    scores = [[0.1, 0.5], [0.49, 0.2], [0.7]]
    assert toxicity_probability(scores) == pytest.approx(2 / 3)
    assert toxicity_probability(scores, threshold=0.6) == pytest.approx(1 / 3)


def test_mean_toxicity_over_all_samples():
    assert mean_toxicity([[0.0, 1.0], [0.5]]) == pytest.approx(1.5 / 3)


@pytest.mark.parametrize("fn", [expected_max_toxicity, toxicity_probability, mean_toxicity])
def test_toxicity_metrics_reject_empty(fn):
    with pytest.raises(ValueError, match="no prompts"):
        fn([])
    with pytest.raises(ValueError, match="prompt 1 has no sample"):
        fn([[0.2], []])
    with pytest.raises(TypeError, match="one list of sample scores per prompt"):
        fn([0.2, 0.3])


# --------------------------------------------------------------------------- distinct-n


def test_distinct_n_hand_computed():
    texts = ["a b a", "a b"]
    # unigrams a b a a b -> 2 unique / 5
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)
    # bigrams (a b) (b a) | (a b) -> 2 unique / 3; n-grams never cross sample boundaries
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)
    # trigrams (a b a) only -> 1 / 1
    assert distinct_n(texts, 3) == pytest.approx(1.0)


def test_distinct_n_empty_and_short_is_zero():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0
    assert distinct_n(["one two"], 3) == 0.0


def test_distinct_n_rejects_bad_input():
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)
    with pytest.raises(TypeError):
        distinct_n("a b c", 1)


def test_mean_distinct_n_averages_over_prompts():
    by_prompt = [["a b a", "a b"], ["x y"], [""]]
    assert mean_distinct_n(by_prompt, 1) == pytest.approx((2 / 5 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="no prompts"):
        mean_distinct_n([], 1)


# --------------------------------------------------------------------------- perplexity

WORDS = "the cat sat on a mat dog ran far away and then slept quietly".split()


@pytest.fixture(scope="module")
def tiny_lm():
    """A random tiny Llama and a word-level tokenizer that prepends BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tok, vocab


def _reference_nll(model, vocab, prompt: str, continuation: str) -> tuple[float, int]:
    """Independent: ids from the vocab by hand, one unpadded sequence, manual log-softmax."""
    p_ids = [1] + [vocab[w] for w in prompt.split()]
    c_ids = [vocab[w] for w in continuation.split()]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    total = 0.0
    for pos in range(len(p_ids), len(p_ids) + len(c_ids)):
        total -= float(logp[pos - 1, ids[0, pos]])
    return total, len(c_ids)


PAIRS = [
    ("the cat", " sat on a mat"),
    ("a dog ran", " far away"),
    ("the", " cat slept quietly and then ran"),
]


def test_conditional_perplexity_matches_independent_computation(tiny_lm):
    model, tok, vocab = tiny_lm
    ref = [_reference_nll(model, vocab, p, c) for p, c in PAIRS]
    expected = math.exp(sum(s for s, _ in ref) / sum(n for _, n in ref))  # token-weighted
    prompts, conts = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    for bs in (1, 2, 8):  # padding must not change the result
        got = conditional_perplexity(model, tok, prompts, conts, batch_size=bs, drop_above=None)
        assert got == pytest.approx(expected, rel=1e-4)
    # token weighting differs from the mean of per-sample perplexities
    per_sample = [math.exp(s / n) for s, n in ref]
    assert abs(expected - sum(per_sample) / len(per_sample)) > 1e-6


def test_conditional_perplexity_skips_empty_and_drops_above(tiny_lm):
    model, tok, vocab = tiny_lm
    prompts, conts = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    base = conditional_perplexity(model, tok, prompts, conts, drop_above=None)
    with_empty = conditional_perplexity(model, tok, prompts + ["the dog"], conts + [""], drop_above=None)
    assert with_empty == pytest.approx(base, rel=1e-6)

    ref = [_reference_nll(model, vocab, p, c) for p, c in PAIRS]
    ppl = sorted(math.exp(s / n) for s, n in ref)
    cut = (ppl[-1] + ppl[-2]) / 2  # drops exactly the worst pair
    kept = [(s, n) for s, n in ref if math.exp(s / n) <= cut]
    assert len(kept) == len(ref) - 1
    expected = math.exp(sum(s for s, _ in kept) / sum(n for _, n in kept))
    got = conditional_perplexity(model, tok, prompts, conts, drop_above=cut)
    assert got == pytest.approx(expected, rel=1e-4)
    assert math.isnan(conditional_perplexity(model, tok, prompts, conts, drop_above=0.5))


def test_conditional_perplexity_errors_and_nan(tiny_lm):
    model, tok, _ = tiny_lm
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        conditional_perplexity(model, tok, ["a", "b"], [" c"])
    assert math.isnan(conditional_perplexity(model, tok, ["the cat"], [""]))
