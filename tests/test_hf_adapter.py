"""detox.wrap on transformers models of two architectures with different tokenizers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, TextIteratorStreamer

import detox
from detox.adapters.transformers import DetoxModel, FusionLogitsProcessor
from detox.artifacts import ArtifactError
from detox.runtime import Calibrator

PROMPTS = ["The weather today is", "We walked along the river and"]


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model, tok


@pytest.fixture(params=["llama", "gpt2"])
def case(request, llama_target_dir, gpt2_target_dir, aligned_llama, aligned_gpt2):
    target, aligned = {"llama": (llama_target_dir, aligned_llama), "gpt2": (gpt2_target_dir, aligned_gpt2)}[request.param]
    model, tok = _load(target)
    return model, tok, aligned


def _greedy(model, tok, prompts, **kw):
    batch = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    return model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, **kw)


def test_strength_zero_reproduces_unfused_tokens(case):
    model, tok, aligned = case
    wrapped = detox.wrap(model, calibrator=aligned, tokenizer=tok, strength=0.0)
    assert isinstance(wrapped, DetoxModel)
    assert torch.equal(_greedy(wrapped, tok, PROMPTS), _greedy(model, tok, PROMPTS))


def test_fused_logits_follow_the_paper_formula(case):
    """Processor output == LM head applied to (1-λ)·h_target + λ·LayerNorm(h_cal·A), computed independently."""
    model, tok, aligned = case
    cal = Calibrator.load(aligned)
    lam = 0.4
    proc = FusionLogitsProcessor(cal, model, tok, strength=lam)
    a = cal.artifact.alignment
    A, gamma, beta = (torch.from_numpy(a[k]) for k in ("A", "ln_weight", "ln_bias"))
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        h_t = out.hidden_states[-1][:, -1]  # after the final norm, right before the LM head
        cal_ids = [cal.manifest.calibrator.bos_token_id] + cal.tokenizer.encode(tok.decode(ids[0], skip_special_tokens=True)).ids
        with torch.no_grad():
            h_cal = cal.torch_model()(torch.tensor([cal_ids]))[0][:, -1]
        h = (1 - lam) * h_t + lam * torch.nn.functional.layer_norm(h_cal @ A, (A.shape[1],), gamma, beta, 1e-5)
        expected = model.get_output_embeddings()(h)
        got = proc(ids, out.logits[:, -1])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, out.logits[:, -1], atol=1e-3)  # the fusion really changed something


def test_fusion_changes_generation_and_supports_sampling_beams_streaming(case):
    model, tok, aligned = case
    wrapped = detox.wrap(model, calibrator=aligned, tokenizer=tok, strength=1.0)
    assert not torch.equal(_greedy(wrapped, tok, PROMPTS), _greedy(model, tok, PROMPTS))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    sampled = wrapped.generate(**batch, max_new_tokens=8, do_sample=True, top_p=0.9, pad_token_id=tok.pad_token_id)
    assert sampled.shape[0] == 2
    beams = wrapped.generate(**batch, max_new_tokens=8, num_beams=3, num_return_sequences=2, pad_token_id=tok.pad_token_id)
    assert beams.shape[0] == 4
    # a streamer sees exactly the text that generate returns
    import threading

    one = tok(PROMPTS[:1], return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("ids", wrapped.generate(
        **one, max_new_tokens=10, do_sample=False, streamer=streamer, pad_token_id=tok.pad_token_id)))
    th.start()
    streamed = "".join(streamer)
    th.join()
    full = tok.decode(result["ids"][0, one["input_ids"].shape[1]:], skip_special_tokens=True)
    assert streamed.strip() == full.strip()


def test_batched_generation_with_padding_matches_one_by_one(case):
    model, tok, aligned = case
    wrapped = detox.wrap(model, calibrator=aligned, tokenizer=tok, strength=0.7)
    batched = _greedy(wrapped, tok, PROMPTS)
    texts_batched = tok.batch_decode(batched[:, -12:], skip_special_tokens=True)
    for prompt, text in zip(PROMPTS, texts_batched):
        single = _greedy(wrapped, tok, [prompt])
        assert tok.decode(single[0, -12:], skip_special_tokens=True) == text


def test_processor_usable_directly_with_generate(case):
    model, tok, aligned = case
    proc = FusionLogitsProcessor(Calibrator.load(aligned), model, tok, strength=0.7)
    direct = _greedy(model, tok, PROMPTS, logits_processor=LogitsProcessorList([proc]))
    wrapped = _greedy(detox.wrap(model, calibrator=aligned, tokenizer=tok, strength=0.7), tok, PROMPTS)
    assert torch.equal(direct, wrapped)


def test_overlapped_fusion_gives_the_same_scores_and_really_overlaps(case, fusion_threads):
    """With ``overlap`` on, each step's calibrator work runs on the worker thread during the forward pass; same
    values as inline (greedy and sampled, the default), which runs it on the calling thread."""
    model, tok, aligned = case
    threads = fusion_threads
    wrapped = detox.wrap(model, calibrator=aligned, tokenizer=tok, strength=0.7)
    assert not wrapped.overlap  # off by default on transformers (torch's own threads keep the cores busy)
    wrapped.overlap = True
    assert "overlap" not in model.__dict__  # a wrapper setting, not forwarded
    kw = dict(output_scores=True, return_dict_in_generate=True)
    overlapped = _greedy(wrapped, tok, PROMPTS, **kw)
    assert sum(t.startswith("detox-fusion") for t in threads) >= 12 - 1  # every step after the first
    wrapped.overlap = False
    threads.clear()
    inline = _greedy(wrapped, tok, PROMPTS, **kw)
    assert threads and not any(t.startswith("detox-fusion") for t in threads)
    assert torch.equal(inline.sequences, overlapped.sequences)
    for a, b in zip(inline.scores, overlapped.scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    sampled = []
    for overlap in (True, False):
        wrapped.overlap = overlap
        torch.manual_seed(0)
        sampled.append(wrapped.generate(**batch, max_new_tokens=10, do_sample=True, top_p=0.9, pad_token_id=tok.pad_token_id))
    assert torch.equal(*sampled)


def test_overlap_leaves_a_single_sequence_inline(case, fusion_threads):
    """A torch target's forward pass hands the GIL back at every operator, so a worker thread made one-row steps
    slower than running the calibrator inline (docs/serve.md): ``overlap`` applies from two rows on."""
    model, tok, aligned = case
    wrapped = detox.wrap(model, calibrator=aligned, tokenizer=tok, strength=0.7)
    wrapped.overlap = True
    one = _greedy(wrapped, tok, PROMPTS[:1])
    assert fusion_threads and not any(t.startswith("detox-fusion") for t in fusion_threads)
    fusion_threads.clear()
    _greedy(wrapped, tok, PROMPTS)
    assert any(t.startswith("detox-fusion") for t in fusion_threads)
    wrapped.overlap = False
    assert torch.equal(_greedy(wrapped, tok, PROMPTS[:1]), one)


def test_fusion_head_is_built_once_and_rebuilt_when_the_output_embedding_changes(case):
    """Building the head converts the calibrator's output matrices (≈ 16 ms for the shipped pair, once per request
    in ``detox serve``): it is built once per wrapped model, and again only when the target's output embedding
    changes in place (training), so the fusion never uses a stale one."""
    model, tok, aligned = case
    wrapped = detox.wrap(model, calibrator=aligned, tokenizer=tok, strength=0.7)
    head = wrapped.logits_processor().head
    _greedy(wrapped, tok, PROMPTS)
    assert wrapped.logits_processor().head is head
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(-0.5)
    assert wrapped.logits_processor().head is not head
    fresh = FusionLogitsProcessor(Calibrator.load(aligned), model, tok, strength=0.7)  # builds its own head
    expected = _greedy(model, tok, PROMPTS, logits_processor=LogitsProcessorList([fresh]))
    assert torch.equal(_greedy(wrapped, tok, PROMPTS), expected)


def test_artifact_for_another_target_is_refused(llama_target_dir, aligned_gpt2):
    model, tok = _load(llama_target_dir)
    with pytest.raises(ArtifactError, match="detox align"):
        detox.wrap(model, calibrator=aligned_gpt2, tokenizer=tok)


def test_unaligned_calibrator_and_no_shipped_match_explain_detox_align(llama_target_dir, tiny_calibrator):
    model, tok = _load(llama_target_dir)
    with pytest.raises(ArtifactError, match="detox align"):
        detox.wrap(model, calibrator=tiny_calibrator, tokenizer=tok)
    with pytest.raises(ArtifactError, match="detox align"):
        detox.wrap(model, tokenizer=tok)  # no shipped calibrator fits a random test model


def test_wrapper_forwards_attributes_and_validates_strength(case):
    model, tok, aligned = case
    wrapped = detox.wrap(model, calibrator=aligned, tokenizer=tok)
    assert wrapped.config is model.config
    assert wrapped.strength == pytest.approx(0.4)  # the artifact's default
    with pytest.raises(ValueError):
        wrapped.strength = 2.0
    with pytest.raises(ValueError, match="strength"):
        detox.wrap(model, calibrator=aligned, tokenizer=tok, strength=1.5)
    with wrapped.disable_fusion():
        assert torch.equal(_greedy(wrapped, tok, PROMPTS), _greedy(model, tok, PROMPTS))
    with pytest.raises(TypeError, match="supported"):
        detox.wrap(object())
