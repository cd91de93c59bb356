"""Cross-tokenizer alignment: shared-token matching, the paper's InfoNCE, and contextual alignment."""

import torch
from transformers import AutoTokenizer

from detox.align_interpolate import AlignmentMap, context_examples, train_context_alignment, train_vocab_alignment
from detox.methods.interpolate import InterpolateConfig
from detox.token_map import shared_token_pairs, token_surface
from detox.fingerprint import hf_vocab_tokens
from detox.runtime import Calibrator


def test_token_surfaces():
    assert token_surface("Ġthe", byte_level=True) == " the"
    assert token_surface("the", byte_level=True) == "the"
    assert token_surface("Ã©", byte_level=True) == "é"
    assert token_surface("\u2581the", byte_level=False) == " the"
    assert token_surface("<0x0A>", byte_level=False) is None
    assert token_surface("\u00e2\u0080", byte_level=True) is None  # half of a UTF-8 character


def test_shared_pairs_match_by_text_across_tokenizer_families(tiny_calibrator, llama_target_dir, gpt2_target_dir):
    cal = Calibrator.load(tiny_calibrator)
    cal_tokens = [cal.tokenizer.id_to_token(i) for i in range(cal.tokenizer.get_vocab_size())]
    for target in (llama_target_dir, gpt2_target_dir):  # byte-level BPE and metaspace BPE
        tok = AutoTokenizer.from_pretrained(target)
        pairs = shared_token_pairs(cal_tokens, hf_vocab_tokens(tok), set(tok.all_special_tokens))
        assert len(pairs) > 100
        for c, t in pairs[:: max(1, len(pairs) // 50)]:
            cal_text = cal.tokenizer.decode([c])
            tgt_text = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(t)])
            assert tgt_text.strip() == cal_text.strip()


def test_vocab_infonce_recovers_a_planted_map():
    g = torch.Generator().manual_seed(0)
    n, d_c, d_t = 400, 16, 24
    cal_emb = torch.randn(n, d_c, generator=g)
    A_true = torch.randn(d_c, d_t, generator=g)
    tgt_emb = cal_emb @ A_true + 0.05 * torch.randn(n, d_t, generator=g)
    pairs = [(i, i) for i in range(n)]
    torch.manual_seed(0)
    untrained = train_vocab_alignment(AlignmentMap(d_c, d_t), cal_emb, tgt_emb, pairs, InterpolateConfig(vocab_epochs=0), progress=False)
    torch.manual_seed(0)
    trained = train_vocab_alignment(AlignmentMap(d_c, d_t), cal_emb, tgt_emb, pairs, InterpolateConfig(vocab_epochs=30), progress=False)
    # top-1 retrieval of the own target row among all 400 by dot product; chance is 1/400
    assert untrained["vocab_top1"] < 0.03
    assert trained["vocab_top1"] > 0.12


def test_contextual_alignment_lowers_heldout_loss_on_a_learnable_problem():
    g = torch.Generator().manual_seed(0)
    n, d_c, d_t, vocab = 3000, 16, 24, 60
    W_out = torch.randn(vocab, d_t, generator=g)
    teacher = AlignmentMap(d_c, d_t)
    states = torch.randn(n, d_c, generator=g)
    with torch.no_grad():
        labels = torch.distributions.Categorical(logits=3 * teacher(states) @ W_out.T).sample()
    amap = AlignmentMap(d_c, d_t)
    m = train_context_alignment(amap, W_out, states, labels, InterpolateConfig(context_epochs=6, context_batch_size=128), progress=False)
    assert m["heldout_ce"] < m["heldout_ce_vocab_only"] - 0.3


def test_context_examples_use_the_generation_time_state(tiny_calibrator, llama_target_dir):
    """Each training state equals what the streaming calibrator holds once the target has produced text[:start]."""
    cal = Calibrator.load(tiny_calibrator)
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    text = "We walked along the river and talked about the weather"
    states, labels = context_examples(cal, tok, [text], progress=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    cal_ends = {0} | {end for _, end in cal.tokenizer.encode(text, add_special_tokens=False).offsets}
    starts = [s for s, _ in enc["offset_mapping"] if s in cal_ends]
    assert len(starts) == len(labels) >= 5
    for i in (1, len(starts) // 2, len(starts) - 1):
        expected = cal.stream().hidden_for(text[: starts[i]])
        torch.testing.assert_close(states[i], expected, atol=1e-4, rtol=1e-4)


def test_aligned_artifacts_record_their_metrics(aligned_llama, aligned_gpt2):
    for path in (aligned_llama, aligned_gpt2):
        m = Calibrator.load(path).manifest
        assert m.alignment.method == "vocab+context"
        for key in ("vocab_shared_tokens", "heldout_ce", "heldout_ce_vocab_only", "align_seconds"):
            assert key in m.alignment.metrics
