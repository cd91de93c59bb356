"""Contrast (expert/anti-expert) fusion: the math against an independent computation, the pair artifact, and
the HF backend on a tiny random llama target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import detox
from detox.artifacts import ArtifactError
from detox.artifacts.manifest import ANTI_ONNX, ANTI_WEIGHTS, Manifest
from detox.fusion import CONTRAST, FusionHead, check_strength, contrast_fuse, top_candidates
from detox.runtime import Calibrator
from detox.stream import PairRunner


def _head(rng, vocab=40, d_cal=6, d_t=10, **rule):
    W = rng.normal(size=(vocab, d_t)).astype(np.float32)
    A = rng.normal(size=(d_cal, d_t)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, size=d_t).astype(np.float32)
    beta = rng.normal(size=d_t).astype(np.float32) * 0.1
    return W, A, gamma, beta, FusionHead.build(W, A, gamma, beta, mode=CONTRAST, **rule)


def _expected(logits, W, A, gamma, beta, h_e, h_a, lam, top_k, alpha):
    """The documented rule, written out in float64 with a full-vocabulary LayerNorm term per calibrator."""
    def term(h):
        x = h.astype(np.float64) @ A
        ln = (x - x.mean()) / np.sqrt(x.var() + 1e-5) * gamma + beta
        return W.astype(np.float64) @ ln

    out = np.full(logits.shape, -np.inf)
    order = np.argsort(-logits)[:top_k]
    top = logits.max()
    for v in order:
        if np.exp(logits[v] - top) >= alpha:  # p(v) >= alpha * max p
            out[v] = logits[v] + lam * (term(h_e)[v] - term(h_a)[v])
    return out


@pytest.mark.parametrize("top_k,alpha", [(8, 0.0), (40, 0.05), (5, 0.5)])
def test_contrast_matches_the_formula_on_numpy_and_torch(top_k, alpha):
    rng = np.random.default_rng(0)
    W, A, gamma, beta, head = _head(rng, top_k=top_k, plausibility=alpha)
    logits = (rng.normal(size=40) * 3).astype(np.float32)
    hidden = rng.normal(size=(2, 6)).astype(np.float32)
    expected = _expected(logits, W, A, gamma, beta, hidden[0], hidden[1], 2.5, top_k, alpha)
    got = head.apply(logits, head.prepare(hidden), 2.5)
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-5, atol=1e-4)
    assert np.isfinite(got).sum() <= top_k

    th = FusionHead.build(*(torch.from_numpy(x) for x in (W, A, gamma, beta)), mode=CONTRAST, top_k=top_k, plausibility=alpha)
    batch = torch.from_numpy(np.stack([logits, logits[::-1].copy()]))
    got_t = th.apply(batch, torch.from_numpy(np.stack([hidden, hidden[::-1].copy()])), 2.5).numpy()
    np.testing.assert_allclose(got_t[0], got, rtol=1e-5, atol=1e-4)
    expected_row2 = _expected(logits[::-1].copy(), W, A, gamma, beta, hidden[1], hidden[0], 2.5, top_k, alpha)
    assert np.array_equal(np.isinf(got_t[1]), np.isinf(expected_row2))


def test_strength_zero_keeps_logits_and_padding_logits_are_never_candidates():
    rng = np.random.default_rng(1)
    *_, head = _head(rng, top_k=10, plausibility=0.0)
    logits = rng.normal(size=44).astype(np.float32)  # 4 padding logits beyond the head's 40 tokens
    logits[42] = 100.0  # the largest logit is padding: still excluded
    hidden = rng.normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_array_equal(head.apply(logits, hidden, 0.0), logits)
    fused = head.apply(logits, hidden, 1.0)
    assert np.isinf(fused[40:]).all() and np.isfinite(fused).sum() == 10


def test_identical_expert_and_anti_expert_only_truncate():
    """λ·(expert − anti) vanishes when both states are equal: the target's own plausible tokens, unchanged."""
    rng = np.random.default_rng(2)
    *_, head = _head(rng, top_k=40, plausibility=0.1)
    logits = (rng.normal(size=40) * 2).astype(np.float32)
    h = rng.normal(size=6).astype(np.float32)
    fused = head.apply(logits, np.stack([h, h]), 5.0)
    idx, keep = top_candidates(logits, 40, 0.1)
    kept = idx[keep]
    np.testing.assert_allclose(fused[kept], logits[kept], atol=1e-5)
    assert np.isinf(np.delete(fused, kept)).all()


def test_strength_ranges_depend_on_the_mode():
    assert check_strength(4.0, CONTRAST) == 4.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_strength(4.0)
    with pytest.raises(ValueError, match=r"\[0, 20\]"):
        contrast_fuse(np.zeros(3), np.array([0]), np.array([True]), np.zeros(1), np.zeros(1), 21.0)


def test_pair_artifact_holds_both_calibrators_and_one_alignment(contrast_llama, tiny_calibrator, tiny_anti):
    cal = Calibrator.load(contrast_llama)
    m = cal.manifest
    assert cal.fusion_mode == "contrast" and cal.has_anti_expert
    assert m.alignment.default_strength == 4.0 and m.alignment.top_k == 20
    assert m.anti_expert == Calibrator.load(tiny_anti).manifest.training
    assert {ANTI_WEIGHTS, ANTI_ONNX} <= set(m.files)
    # the pair runner gives both models' states, expert first, on ONNX Runtime and torch alike
    ids = cal.tokenizer.encode("The river runs").ids
    expert, anti = cal.torch_model(), cal.torch_model("anti")
    with torch.inference_mode():
        want = [mod(torch.tensor([[0] + ids]))[0][0, -1].numpy() for mod in (expert, anti)]
    assert np.abs(want[0] - want[1]).max() > 1e-3  # the anti-expert really is another model
    for runner in (cal.onnx_runner(), cal.torch_runner()):
        assert isinstance(runner, PairRunner)
        h, _ = runner.run([0] + ids, runner.empty_state())
        np.testing.assert_allclose(np.asarray(h), np.stack(want), rtol=1e-4, atol=1e-4)


def test_anti_expert_with_another_tokenizer_is_refused(tiny_calibrator, llama_target_dir, tmp_path):
    from detox.alignment import align_artifact
    from detox.config import CalibratorConfig
    from detox.training import TrainSettings, train_calibrator
    from tests.conftest import SAMPLE_TEXT

    other = tmp_path / "other"
    train_calibrator([SAMPLE_TEXT], other, TrainSettings(max_steps=1, batch_size=4, seq_len=16, checkpoint_every=0,
                     model=CalibratorConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64)),
                     progress=False)
    with pytest.raises(ArtifactError, match="share the expert's tokenizer"):
        align_artifact(str(tiny_calibrator), str(llama_target_dir), str(tmp_path / "out"), anti_expert=str(other),
                       progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_manifest_refuses_half_a_pair(contrast_llama):
    raw = Calibrator.load(contrast_llama).manifest.model_dump()
    with pytest.raises(ValueError, match="anti_expert"):
        Manifest.model_validate({**raw, "anti_expert": None})
    interpolate = {**raw, "anti_expert": None, "alignment": {**raw["alignment"], "fusion": "interpolate"}}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Manifest.model_validate(interpolate)


def test_realigning_a_pair_keeps_the_anti_expert(contrast_llama, gpt2_target_dir, tmp_path):
    from detox.alignment import AlignSettings, align_artifact
    from tests.conftest import SAMPLE_TEXT

    out = tmp_path / "gpt2"
    align_artifact(str(contrast_llama), str(gpt2_target_dir), str(out), data=[str(SAMPLE_TEXT)],
                   settings=AlignSettings(vocab_epochs=1, context_epochs=1, max_context_docs=20), progress=False,
                   log=lambda m: None)
    a, b = Calibrator.load(contrast_llama), Calibrator.load(out)
    assert b.fusion_mode == "contrast"
    assert a.manifest.files[ANTI_WEIGHTS].sha256 == b.manifest.files[ANTI_WEIGHTS].sha256


def test_hf_wrap_fuses_each_step_by_the_contrast_rule(contrast_llama, llama_target_dir, one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(llama_target_dir).eval()
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    cal = Calibrator.load(contrast_llama)
    wrapped = detox.wrap(model, calibrator=cal, tokenizer=tok)
    assert wrapped.strength == 4.0
    with pytest.raises(ValueError, match=r"\[0, 20\]"):
        wrapped.strength = 25

    class Record(LogitsProcessor):
        def __init__(self):
            self.steps = []

        def __call__(self, input_ids, scores):
            self.steps.append((input_ids.clone(), scores.clone()))
            return scores

    raw, fused = Record(), Record()
    proc = wrapped.logits_processor()
    inputs = tok(["the river", "a stone by"], return_tensors="pt", padding=True)
    model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                   logits_processor=LogitsProcessorList([raw, proc, fused]))
    W, a = model.get_output_embeddings().weight.detach().double().numpy(), cal.alignment_arrays()
    expert, anti = cal.torch_model(), cal.torch_model("anti")
    moved = 0.0
    for (ids, scores), (_, out) in zip(raw.steps, fused.steps):
        for row in range(ids.shape[0]):
            text = tok.decode(ids[row], skip_special_tokens=True)
            cal_ids = torch.tensor([[0] + cal.tokenizer.encode(text).ids])
            with torch.inference_mode():
                h_e, h_a = (mod(cal_ids)[0][0, -1].numpy() for mod in (expert, anti))
            want = _expected(scores[row].double().numpy(), W, a["A"], a["ln_weight"], a["ln_bias"], h_e, h_a, 4.0, 20, 0.001)
            got = out[row].numpy()
            assert np.array_equal(np.isinf(got), np.isinf(want))
            np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-4, atol=2e-3)
            moved = max(moved, float(np.abs(got - scores[row].numpy())[np.isfinite(got)].max()))
    assert moved > 1e-2  # the anti-expert term really changed the logits
