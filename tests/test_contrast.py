"""Contrast (expert/anti-expert) fusion: the math against an independent computation, the pair artifact, and
the HF backend on a tiny random llama target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import detox
from detox.artifacts import ArtifactError
from detox.artifacts.manifest import ANTI_ONNX, ANTI_WEIGHTS, CALIBRATOR_ONNX, Manifest
from detox.fusion import CONTRAST, INTERPOLATE, top_candidates
from detox.methods import get_method
from detox.methods.contrast import ContrastConfig, ContrastHead
from detox.runtime import Calibrator
from detox.stream import PairRunner


def _head(rng, vocab=40, vocab_cal=30, d_cal=6, **rule):
    token_map = rng.integers(0, vocab_cal, size=vocab)
    token_map[[3, 7]] = -1  # two target tokens without a calibrator counterpart
    E_e = rng.normal(size=(vocab_cal, d_cal)).astype(np.float32)
    E_a = rng.normal(size=(vocab_cal, d_cal)).astype(np.float32)
    return token_map, E_e, E_a, ContrastHead(token_map, E_e, E_a, ContrastConfig(**{"suppress_only": False, **rule}))


def _log_softmax64(x):
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def _expected(logits, token_map, E_e, E_a, h_e, h_a, lam, top_k, alpha, suppress=False):
    """The documented rule, written out in float64: log p_expert − log p_anti of each target token's calibrator
    counterpart (0 without one), added on the target's plausible top-k; −inf elsewhere."""
    ratio = _log_softmax64(E_e @ h_e) - _log_softmax64(E_a @ h_a)
    if suppress:
        ratio = np.minimum(ratio, 0.0)
    out = np.full(logits.shape, -np.inf)
    order = np.argsort(-logits)[:top_k]
    top = logits.max()
    for v in order:
        if np.exp(float(logits[v]) - float(top)) >= alpha:  # p(v) >= alpha * max p
            out[v] = logits[v] + lam * (ratio[token_map[v]] if token_map[v] >= 0 else 0.0)
    return out


@pytest.mark.parametrize("top_k,alpha", [(8, 0.0), (40, 0.05), (5, 0.5)])
def test_contrast_matches_the_formula_on_numpy_and_torch(top_k, alpha):
    rng = np.random.default_rng(0)
    token_map, E_e, E_a, head = _head(rng, top_k=top_k, plausibility=alpha)
    logits = (rng.normal(size=40) * 3).astype(np.float32)
    hidden = rng.normal(size=(2, 6)).astype(np.float32)
    expected = _expected(logits, token_map, E_e, E_a, hidden[0], hidden[1], 2.5, top_k, alpha)
    got = head.apply(logits, head.prepare(hidden), 2.5)
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-5, atol=1e-4)
    assert np.isfinite(got).sum() <= top_k

    th = ContrastHead(torch.from_numpy(token_map), torch.from_numpy(E_e), torch.from_numpy(E_a),
                      ContrastConfig(top_k=top_k, plausibility=alpha, suppress_only=False))
    batch = torch.from_numpy(np.stack([logits, logits[::-1].copy()]))
    states = torch.from_numpy(np.stack([hidden, hidden[::-1].copy()]))
    got_t = th.apply(batch, th.prepare(states), 2.5).numpy()
    np.testing.assert_allclose(got_t[0], got, rtol=1e-5, atol=1e-4)
    row2 = _expected(logits[::-1].copy(), token_map, E_e, E_a, hidden[1], hidden[0], 2.5, top_k, alpha)
    assert np.array_equal(np.isinf(got_t[1]), np.isinf(row2))
    np.testing.assert_allclose(got_t[1][np.isfinite(row2)], row2[np.isfinite(row2)], rtol=1e-5, atol=1e-4)


def test_strength_zero_keeps_logits_and_padding_logits_are_never_candidates():
    rng = np.random.default_rng(1)
    *_, head = _head(rng, top_k=10, plausibility=0.0)
    logits = rng.normal(size=44).astype(np.float32)  # 4 padding logits beyond the head's 40 tokens
    logits[42] = 100.0  # the largest logit is padding: still excluded
    hidden = head.prepare(rng.normal(size=(2, 6)).astype(np.float32))
    np.testing.assert_array_equal(head.apply(logits, hidden, 0.0), logits)
    fused = head.apply(logits, hidden, 1.0)
    assert np.isinf(fused[40:]).all() and np.isfinite(fused).sum() == 10


def test_suppress_only_lowers_what_the_anti_expert_prefers_and_raises_nothing():
    rng = np.random.default_rng(3)
    token_map, E_e, E_a, two_sided = _head(rng, top_k=40, plausibility=0.0)
    one_sided = ContrastHead(token_map, E_e, E_a, ContrastConfig(top_k=40, plausibility=0.0, suppress_only=True))
    logits = rng.normal(size=40).astype(np.float32)
    ratio = two_sided.prepare(rng.normal(size=(2, 6)).astype(np.float32))
    both, down = two_sided.apply(logits, ratio, 3.0), one_sided.apply(logits, ratio, 3.0)
    assert (down <= logits + 1e-6).all() and (down < logits - 1e-3).any()
    np.testing.assert_allclose(down, np.minimum(both, logits), atol=1e-5)


def test_token_scale_scales_each_tokens_change_and_leaves_zero_scaled_tokens_alone():
    """``token_scale`` (``detox align --exempt-identity``): a candidate's change is its scale times the unscaled
    change, in numpy and torch alike; scale 0 leaves the target's logit as it is."""
    rng = np.random.default_rng(5)
    token_map, E_e, E_a, _ = _head(rng)
    rule = ContrastConfig(top_k=40, plausibility=0.0, suppress_only=True)
    scale = rng.choice([0.0, 0.25, 1.0], size=40).astype(np.float32)
    logits = rng.normal(size=40).astype(np.float32)
    ratio = ContrastHead(token_map, E_e, E_a, rule).prepare(rng.normal(size=(2, 6)).astype(np.float32))
    full = ContrastHead(token_map, E_e, E_a, rule).apply(logits, ratio, 4.0)
    scaled = ContrastHead(token_map, E_e, E_a, rule, scale).apply(logits, ratio, 4.0)
    assert (full[scale == 0.0] < logits[scale == 0.0] - 1e-3).any()  # the check below can fail
    np.testing.assert_allclose(scaled - logits, scale * (full - logits), atol=1e-5)
    th = ContrastHead(*(torch.from_numpy(x) for x in (token_map, E_e, E_a)), rule, torch.from_numpy(scale))
    np.testing.assert_allclose(th.apply(torch.from_numpy(logits), torch.from_numpy(ratio), 4.0).numpy(), scaled,
                               atol=1e-5)


def test_identical_expert_and_anti_expert_only_truncate():
    """log p_expert − log p_anti vanishes for identical models: the target's own plausible tokens, unchanged."""
    rng = np.random.default_rng(2)
    token_map, E_e, _, _ = _head(rng)
    head = ContrastHead(token_map, E_e, E_e.copy(), ContrastConfig(top_k=40, plausibility=0.1))
    logits = (rng.normal(size=40) * 2).astype(np.float32)
    h = rng.normal(size=6).astype(np.float32)
    fused = head.apply(logits, head.prepare(np.stack([h, h])), 5.0)
    idx, keep = top_candidates(logits, 40, 0.1)
    kept = idx[keep]
    np.testing.assert_allclose(fused[kept], logits[kept], atol=1e-5)
    assert np.isinf(np.delete(fused, kept)).all()


def test_strength_ranges_depend_on_the_mode():
    assert get_method(CONTRAST).config.check_strength(4.0) == 4.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_method(INTERPOLATE).config.check_strength(4.0)
    *_, head = _head(np.random.default_rng(0), top_k=4, plausibility=0.0)
    with pytest.raises(ValueError, match=r"\[0, 20\]"):
        head.apply(np.zeros(30), np.zeros(30), 21.0)


def test_token_map_maps_each_target_token_to_the_calibrator_token_its_text_starts_with(tiny_calibrator):
    from detox.token_map import build_token_map

    tok = Calibrator.load(tiny_calibrator).tokenizer
    word = next(t for t in (tok.id_to_token(i) for i in range(tok.get_vocab_size())) if t.startswith("Ġ") and len(t) > 3)
    targets = [word, word + "zzqx", "<|im_start|>", "\u0120\u00e2", None]  # exact, first piece, special, partial byte, hole
    token_map, metrics = build_token_map(tok, targets, {"<|im_start|>"})
    assert token_map[0] == tok.token_to_id(word)
    assert token_map[1] == tok.token_to_id(word)
    assert list(token_map[2:]) == [-1, -1, -1]
    assert metrics["token_map_exact"] == pytest.approx(0.2) and metrics["token_map_unmapped"] == pytest.approx(0.6)


def test_pair_artifact_holds_both_calibrators_and_one_alignment(contrast_llama, tiny_calibrator, tiny_anti):
    cal = Calibrator.load(contrast_llama)
    m = cal.manifest
    assert cal.fusion_mode == "contrast" and cal.has_anti_expert
    assert m.alignment.default_strength == 8.0 and m.alignment.top_k == 20 and m.alignment.suppress_only and m.alignment.method == "token-map"
    assert set(cal.alignment_arrays()) == {"token_map"}
    assert m.anti_expert == Calibrator.load(tiny_anti).manifest.training
    assert ANTI_WEIGHTS in m.files and CALIBRATOR_ONNX in m.files and ANTI_ONNX not in m.files  # one graph for both
    # torch: the pair runner gives both models' states, expert first; ONNX Runtime: the pair's graph gives the
    # log-ratio the head computes from those states
    ids = cal.tokenizer.encode("The river runs").ids
    expert, anti = cal.torch_model(), cal.torch_model("anti")
    with torch.inference_mode():
        want = [mod(torch.tensor([[0] + ids]))[0][0, -1].numpy() for mod in (expert, anti)]
    assert np.abs(want[0] - want[1]).max() > 1e-3  # the anti-expert really is another model
    runner = cal.torch_runner()
    assert isinstance(runner, PairRunner)
    h, _ = runner.run([0] + ids, runner.empty_state())
    np.testing.assert_allclose(np.asarray(h), np.stack(want), rtol=1e-4, atol=1e-4)
    onnx = cal.onnx_runner()
    assert onnx.gives_log_ratio and onnx.weights_dtype == m.alignment.settings["onnx_weights"] == "float32"
    ratio, _ = onnx.run([0] + ids, onnx.empty_state())
    head = cal.fusion_head(np.zeros((cal.alignment_arrays()["token_map"].shape[0], 4), np.float32))
    np.testing.assert_allclose(ratio, head.prepare(np.stack(want)), rtol=1e-4, atol=1e-4)


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


def test_alignment_text_for_a_contrast_pair_is_refused(contrast_llama, llama_target_dir, tmp_path):
    """A contrast pair's alignment is a token map: alignment text would be silently unused, so it is an error."""
    from detox.alignment import align_artifact, alignment_fusion
    from tests.conftest import SAMPLE_TEXT

    assert alignment_fusion(str(contrast_llama)).name == "contrast"
    with pytest.raises(ValueError, match="Drop --data"):
        align_artifact(str(contrast_llama), str(llama_target_dir), str(tmp_path / "out"), [str(SAMPLE_TEXT)],
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
    from detox.alignment import align_artifact

    out = tmp_path / "gpt2"
    align_artifact(str(contrast_llama), str(gpt2_target_dir), str(out), progress=False, log=lambda m: None)
    a, b = Calibrator.load(contrast_llama), Calibrator.load(out)
    assert b.fusion_mode == "contrast"
    assert a.manifest.files[ANTI_WEIGHTS].sha256 == b.manifest.files[ANTI_WEIGHTS].sha256


def test_hf_wrap_fuses_each_step_by_the_contrast_rule(contrast_llama, llama_target_dir, one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(llama_target_dir).eval()
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    cal = Calibrator.load(contrast_llama)
    wrapped = detox.wrap(model, calibrator=cal, tokenizer=tok)
    assert wrapped.strength == 8.0
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
    token_map = cal.alignment_arrays()["token_map"]
    E_e, E_a = (m.embed.weight.detach().numpy() for m in (cal.torch_model(), cal.torch_model("anti")))
    expert, anti = cal.torch_model(), cal.torch_model("anti")
    moved = 0.0
    for (ids, scores), (_, out) in zip(raw.steps, fused.steps):
        for row in range(ids.shape[0]):
            text = tok.decode(ids[row], skip_special_tokens=True)
            cal_ids = torch.tensor([[0] + cal.tokenizer.encode(text).ids])
            with torch.inference_mode():
                h_e, h_a = (mod(cal_ids)[0][0, -1].numpy() for mod in (expert, anti))
            want = _expected(scores[row].double().numpy(), token_map, E_e, E_a, h_e, h_a, 8.0, 20, 0.001, suppress=True)
            got = out[row].numpy()
            assert np.array_equal(np.isinf(got), np.isinf(want))
            np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-4, atol=2e-3)
            moved = max(moved, float(np.abs(got - scores[row].numpy())[np.isfinite(got)].max()))
    assert moved > 1e-2  # the anti-expert really changed the logits
