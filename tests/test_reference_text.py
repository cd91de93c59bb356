"""Reference-text scoring: the per-token log-probabilities under the fused and unfused distributions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import detox
from detox.methods.contrast import ContrastConfig, ContrastHead
from detox.reference_text import ReferenceScore, read_lines, score_ids, score_reference_texts, token_log_probs

from conftest import SAMPLE_TEXT


def _head(vocab: int, top_k: int, plausibility: float) -> ContrastHead:
    # token v maps to calibrator token v; the embeddings are unused: the tests pass the log-ratio itself
    return ContrastHead(torch.arange(vocab), torch.zeros(vocab, 2), torch.zeros(vocab, 2),
                        ContrastConfig(top_k=top_k, plausibility=plausibility, suppress_only=True))


def test_a_suppressed_token_gets_less_likely_and_the_others_more():
    torch.manual_seed(0)
    T, V, x = 6, 12, 5
    logits = torch.randn(T, V)
    ratio = torch.zeros(T, V)
    ratio[:, x] = -3.0  # the pair says: x is the anti-expert's token
    ratio[:, x + 1] = +2.0  # suppress-only: a positive log-ratio boosts nothing
    head = _head(V, top_k=V, plausibility=0.0)  # every token a candidate: no truncation
    with_x = token_log_probs(head, logits, ratio, torch.full((T,), x), strength=2.0)
    assert bool((with_x["fused_untruncated"] < with_x["unfused"] - 1.0).all())
    assert torch.equal(with_x["fused_in_support"], with_x["fused_untruncated"]) and bool(with_x["support"].all())
    other = token_log_probs(head, logits, ratio, torch.full((T,), x + 1), strength=2.0)
    assert bool((other["fused_untruncated"] > other["unfused"]).all())  # x's mass went to the others
    want = (logits + torch.where(ratio < 0, 2.0 * ratio, 0.0)).log_softmax(-1)[:, x]  # the rule, written out
    torch.testing.assert_close(with_x["fused_untruncated"], want)


def test_truncation_is_reported_as_support_and_renormalised_on_both_sides():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -9.0]])
    ratio = torch.tensor([[0.0, -1.0, -2.0, 0.0, 0.0]])
    head = _head(5, top_k=3, plausibility=0.0)  # candidates: tokens 0, 1, 2
    inside = token_log_probs(head, logits, ratio, torch.tensor([1]), strength=1.0)
    outside = token_log_probs(head, logits, ratio, torch.tensor([3]), strength=1.0)
    assert bool(inside["support"][0]) and not bool(outside["support"][0])
    assert outside["fused_in_support"][0] == -math.inf and outside["unfused_in_support"][0] == -math.inf
    kept = torch.tensor([4.0, 3.0, 0.0])
    assert inside["unfused_in_support"][0] == pytest.approx(float(kept.log_softmax(-1)[1]))
    assert inside["fused_in_support"][0] == pytest.approx(float((kept + torch.tensor([0.0, -1.0, -2.0])).log_softmax(-1)[1]))
    assert outside["fused_untruncated"][0] == pytest.approx(float(logits[0].log_softmax(-1)[3] - (logits[0] + ratio[0]).logsumexp(-1) + logits[0].logsumexp(-1)))


@pytest.fixture(scope="module")
def wrapped(contrast_llama, llama_target_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_target_dir).eval()
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    return detox.wrap(model, calibrator=str(contrast_llama), tokenizer=tok)


def test_strength_zero_gives_ratio_exactly_one(wrapped, one_torch_thread):
    texts = read_lines(SAMPLE_TEXT)[:4]
    wrapped.strength = 0.0
    r = score_reference_texts(wrapped, texts, progress=False)
    assert r.ratio_untruncated == 1.0 and r.ratio_in_support == 1.0 and r.support_share == 1.0
    assert r.perplexity_unfused > 1 and r.tokens > 4 * 3
    wrapped.strength = 8.0
    fused = score_reference_texts(wrapped, texts, progress=False)
    assert fused.perplexity_unfused == r.perplexity_unfused and fused.tokens == r.tokens
    assert fused.ratio_untruncated != 1.0 and 0 < fused.support_share < 1  # top-20 of a 600-token vocabulary


def test_fused_log_probs_are_those_generation_samples_from(wrapped, one_torch_thread):
    """Positions line up with generate's own fused scores (the processor's output at each step)."""
    tok = wrapped.tokenizer
    wrapped.strength = 8.0
    prompt = torch.tensor([[tok.bos_token_id] + tok("the river", add_special_tokens=False)["input_ids"]])
    out = wrapped.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    lp = score_ids(wrapped.logits_processor(), wrapped.model, out.sequences)
    n = prompt.shape[1]
    for step, scores in enumerate(out.scores):
        token = out.sequences[0, n + step]
        want = scores[0].log_softmax(-1)[token]
        assert lp["support"][n - 1 + step]
        assert float(lp["fused_in_support"][n - 1 + step]) == pytest.approx(float(want), abs=1e-3)


def test_eval_reference_text_option(tmp_path, llama_target_dir, contrast_llama):
    from detox.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "text": "the river", "group": "rivers"}) + "\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(read_lines(SAMPLE_TEXT)[:3]) + "\n")
    out = tmp_path / "o"
    base = ["eval", "--target", str(llama_target_dir), "--prompts", str(prompts), "--samples", "2", "--max-new-tokens", "4",
            "--no-perplexity"]
    r = CliRunner().invoke(main, base + ["--calibrator", str(contrast_llama), "--out", str(out), "--reference-text", str(ref)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    rt = summary["reference_text"]
    assert ReferenceScore.__dataclass_fields__.keys() <= rt.keys()
    assert rt["texts"] == 3 and rt["strength"] == 8.0 and rt["file"] == str(ref.resolve())
    assert rt["ratio_untruncated"] == pytest.approx(rt["perplexity_fused_untruncated"] / rt["perplexity_unfused"])
    assert summary["identity"]["by_group"]["rivers"]["num_prompts"] == 1
    assert "fusion rule without truncation" in (out / "summary.md").read_text()
    r = CliRunner().invoke(main, base + ["--no-calibrator", "--out", str(tmp_path / "o1"), "--reference-text", str(ref)])
    assert r.exit_code == 2 and "--reference-text" in r.output and not (tmp_path / "o1").exists()
    ref.write_text("\n\n")
    r = CliRunner().invoke(main, base + ["--calibrator", str(contrast_llama), "--out", str(tmp_path / "o2"),
                                         "--reference-text", str(ref)])
    assert r.exit_code == 1 and "ref.txt: no text lines" in r.output and not (tmp_path / "o2").exists()
