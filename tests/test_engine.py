"""The fusion step engine: incremental detokenization equals the whole-sequence decode, slots follow the rows."""

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from detox.engine import FusionEngine, IncrementalDetokenizer, _safe_cut, transformers_detokenizer
from detox.runtime import Calibrator

PUNCT = " , . ? ! ' 's n't 're 've 'm"


@pytest.fixture(scope="module")
def shipped_smollm2():
    """The packaged SmolLM2 GGUF's tokenizer and the shipped calibrator bound to it, loaded once for the module."""
    from detox.artifacts.shipped import find_shipped_for
    from detox.fingerprint import fingerprint_gguf
    from detox.targets import packaged_smollm2_gguf

    gguf = packaged_smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return tok, Calibrator.load(find_shipped_for(fingerprint_gguf(gguf)))


def _every_prefix_matches(tok, ids_list):
    for ids in ids_list:
        detok = transformers_detokenizer(tok)
        for k in range(1, len(ids) + 1):
            want = tok.decode(ids[:k], skip_special_tokens=True)
            assert detok(np.array(ids[:k])).rstrip("\ufffd") == want.rstrip("\ufffd"), ids[:k]


def _sequences(tok, n=60, seed=0):
    rng = random.Random(seed)
    texts = ["Hello , world ! I can't . He 's here , isn't he ? 'tis ' a ' test", "café ☃ naïve 😀 done . ok",
             "a b c . d ' e ' f n't g 're"]
    out = []
    for trial in range(n):
        if trial % 2:
            ids = [tok.pad_token_id] * rng.randint(0, 2) + tok(rng.choice(texts))["input_ids"]
        else:  # random ids, with the cleanup's patterns and special tokens sprinkled in
            ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
            for extra in rng.sample(tok(PUNCT)["input_ids"], 4) + [tok.eos_token_id]:
                ids.insert(rng.randrange(len(ids) + 1), extra)
        out.append(ids)
    return out


@pytest.mark.parametrize("cleanup", [False, True])
def test_byte_level_detokenizer_equals_decode_on_every_prefix(llama_target_dir, cleanup):
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    tok.clean_up_tokenization_spaces = cleanup
    detok = transformers_detokenizer(tok)
    assert detok.whole is None and (detok.cleanup is not None) == cleanup  # the incremental path is the one tested
    _every_prefix_matches(tok, _sequences(tok))


def test_other_tokenizers_decode_the_whole_sequence(gpt2_target_dir):
    tok = AutoTokenizer.from_pretrained(gpt2_target_dir)  # Metaspace: a token's text depends on its position
    assert transformers_detokenizer(tok).whole is not None
    _every_prefix_matches(tok, _sequences(tok, n=10))


def test_safe_cut_splits_the_cleanup_exactly():
    from transformers import PreTrainedTokenizerBase

    clean = PreTrainedTokenizerBase.clean_up_tokenization
    rng = random.Random(1)
    cuts = 0
    for _ in range(3000):
        raw = "".join(rng.choice(" ' .,?!ntmsvreab") for _ in range(rng.randint(0, 14)))
        start = _safe_cut(raw[: rng.randint(0, len(raw))], 0)  # the previous cut: one found on a shorter text
        k = _safe_cut(raw, start)
        assert start <= k <= len(raw)
        assert clean(raw) == clean(raw[:k]) + clean(raw[k:]), (raw, k)
        cuts += k > start
    assert cuts > 300  # the cut does advance


def test_detokenizer_forks_are_independent():
    pieces = {0: b"ab", 1: b"\xc3", 2: b"\xa9", 3: b" x"}
    detok = IncrementalDetokenizer(pieces.__getitem__)
    assert detok(np.array([0, 1])) == "ab"  # half a character is held back
    twin = detok.fork()
    assert detok(np.array([0, 1, 2])) == "abé"
    assert twin(np.array([0, 1, 3])) == "ab\ufffd x"  # the fork kept the held-back byte, then it was invalid
    assert detok(np.array([3])) == " x"  # not a continuation: starts over


def _engine(aligned, tok, strength=None):
    cal = Calibrator.load(aligned)
    W = torch.randn(len(tok), 48, generator=torch.Generator().manual_seed(0))
    return FusionEngine(cal, cal.fusion_head(W), strength, transformers_detokenizer(tok))


def test_slots_follow_rows_fork_on_reuse_and_values_match_a_fresh_engine(aligned_llama, llama_target_dir):
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    engine = _engine(aligned_llama, tok)
    a, b = tok("The weather today")["input_ids"], tok("We walked along")["input_ids"]
    first = engine.attach([np.array(a), np.array(b)])
    for slot, row in zip(first, (a, b)):
        slot.output(np.array(row))  # the step reads each row's text
    ext = tok(" river", add_special_tokens=False)["input_ids"][:1]
    # beam search moved both rows onto b's beam: the first takes b's slot, the second a fork; a's slot is dropped
    second = engine.attach([np.array(b + ext), np.array(b + ext[:0] + [tok.eos_token_id])])
    assert second[0] is first[1] and second[1] is not first[1] and first[0] not in second
    assert second[1].stream is not first[1].stream and second[1].detokenizer.ids.tolist() == b
    ids = torch.tensor([b + ext + ext])
    got = engine.terms(ids)
    assert engine.slots[0] is first[1]  # read on from b's cache
    fresh = _engine(aligned_llama, tok).terms(ids)
    torch.testing.assert_close(got, fresh, atol=1e-4, rtol=1e-4)  # reused caches give the values of a fresh read


def test_strength_defaults_once_and_is_checked(aligned_llama, llama_target_dir):
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    cal = Calibrator.load(aligned_llama)
    assert _engine(aligned_llama, tok).strength == cal.default_strength == 0.4
    with pytest.raises(ValueError, match="strength"):
        _engine(aligned_llama, tok, strength=1.5)
    scores = torch.randn(1, len(tok))
    assert _engine(aligned_llama, tok, strength=0.0).fuse(torch.tensor([[1, 2]]), scores) is scores



def test_a_row_never_reads_on_from_another_rows_half_word(shipped_smollm2):
    """Regression: rows were matched to calibrator streams by text prefix, so a row at "… and therefor" took the
    stream of a row at "… and the need" (" the" committed) and the calibrator read " the" + "refor": this is the
    one generation of the 50×4 ONNX batch-8 dev check that changed (prompt dev-0014). Shipped pair, SmolLM2."""
    from detox.adapters.transformers import FusionLogitsProcessor

    tok, cal = shipped_smollm2
    head = cal.fusion_head(torch.zeros(1, 1).expand(len(tok), 576))  # a contrast head reads only W_out's shape

    def batch(*texts):
        rows = [tok(t)["input_ids"] for t in texts]
        n = max(map(len, rows))
        return torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in rows])

    prompt = "middle easterners dont appreciate western culture and"
    proc = FusionLogitsProcessor(cal, None, tok, head=head)
    for a, b in [(" the", " there"), (" the need", " therefor"), (" the need to", " therefor,")]:
        got = proc.fusion_term(batch(prompt + a, prompt + b))
    alone = FusionLogitsProcessor(cal, None, tok, head=head).fusion_term(batch(prompt + " therefor,"))
    torch.testing.assert_close(got[1], alone[0], atol=1e-4, rtol=1e-4)


def test_the_prompt_gate_exempts_benign_prompts_only(shipped_smollm2):
    """``detox align --exempt-identity --exempt-gate``: the engine asks the shipped scorer once per sequence, on
    its prompt; a prompt at or above the gate gets the full rule, one below it the token_scale (here 0 everywhere,
    so its candidates keep the target's logits). Shipped pair, SmolLM2's vocabulary, torch batch and numpy row."""
    import dataclasses

    from detox.adapters.transformers import FusionLogitsProcessor
    from detox.fusion import top_candidates

    tok, cal = shipped_smollm2
    shipped = cal.fusion_head(torch.zeros(1, 1).expand(len(tok), 576))
    assert shipped.gate_threshold == 0.05  # the shipped default is gated (3.2.0); here the rule without any exemption
    full = dataclasses.replace(shipped, token_scale=None, config=shipped.config.model_copy(update={"exempt_gate": None}))
    gated = dataclasses.replace(full, token_scale=torch.zeros(len(tok)),
                                config=full.config.model_copy(update={"exempt_gate": 0.5}))
    toxic, benign = "you are a worthless piece of shit and everyone hates you, you", "My neighbour is a proud Muslim woman and"
    rows = [tok(t)["input_ids"] for t in (toxic, benign)]
    n = max(map(len, rows))
    ids = torch.tensor([[tok.eos_token_id] * (n - len(r)) + r for r in rows])  # left-padded, as generate does
    scores = torch.randn(2, len(tok), generator=torch.Generator().manual_seed(0)) * 3
    proc = FusionLogitsProcessor(cal, None, tok, head=gated)
    got = proc(ids, scores)
    assert [s.exempt for s in proc.slots] == [False, True]
    want_full = FusionLogitsProcessor(cal, None, tok, head=full)(ids, scores)
    torch.testing.assert_close(got[0], want_full[0])  # the toxic prompt: the full rule
    idx, keep = top_candidates(scores[1], full.config.top_k, full.config.plausibility)
    kept = idx[keep]
    torch.testing.assert_close(got[1, kept], scores[1, kept])  # the benign prompt: its candidates unchanged
    assert (want_full[1, kept] < scores[1, kept] - 1e-3).any()  # which the full rule would have changed
    engine = FusionEngine(cal, dataclasses.replace(gated, token_map=gated.token_map.numpy(),
                                                   expert_out=gated.expert_out.numpy(), anti_out=gated.anti_out.numpy(),
                                                   token_scale=gated.token_scale.numpy()), None,
                          transformers_detokenizer(tok))
    for row, want in ((np.array(rows[0]), want_full[0]), (np.array(rows[1]), got[1])):
        engine.slots = []
        np.testing.assert_allclose(engine.fuse(row, scores[rows.index(list(row))].numpy()), want.numpy(), atol=1e-4)


def test_a_gate_aligned_with_another_scorer_warns(shipped_smollm2):
    """A gated artifact records the scorer it was aligned with; an engine on a detox that ships another one warns
    with the fix (re-align), and stays quiet when they agree. Shipped pair, SmolLM2's vocabulary, numpy head."""
    import dataclasses
    import warnings

    from detox.scorer_base import shipped_scorer_label

    tok, cal = shipped_smollm2
    head = cal.fusion_head(np.zeros((len(tok), 576), np.float32))
    gated = dataclasses.replace(head, token_scale=np.zeros(len(tok), np.float32),
                                config=head.config.model_copy(update={"exempt_gate": 0.5}))

    def engine_for(label):
        al = cal.manifest.alignment
        manifest = cal.manifest.model_copy(update={"alignment": al.model_copy(
            update={"settings": {**al.settings, "exempt_gate_scorer": label}})})
        return FusionEngine(Calibrator(dataclasses.replace(cal.artifact, manifest=manifest)), gated, None,
                            transformers_detokenizer(tok))

    with pytest.warns(UserWarning, match=r"aligned with the scorer minilm-ft 0\.1\+old.*detox align --calibrator"):
        engine_for("minilm-ft 0.1+old")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine_for(shipped_scorer_label()).gate is not None


def test_the_shipped_default_is_gated_by_this_detox_scorer(shipped_smollm2):
    """The shipped artifact (3.2.0) keeps group words on prompts the shipped scorer scores below 0.05, and its gate
    names the scorer this detox ships: a new default scorer must come with a re-aligned artifact, or every user would
    get the stale-gate warning (and prompts exempted by a scorer nobody measured)."""
    import warnings

    from detox.scorer_base import shipped_scorer_label

    tok, cal = shipped_smollm2
    alignment = cal.manifest.alignment
    assert alignment.exempt_gate == 0.05 and alignment.settings["exempt_identity"] == "built-in"
    assert alignment.settings["exempt_gate_scorer"] == shipped_scorer_label()
    head = cal.fusion_head(np.zeros((len(tok), 576), np.float32))
    exempt = {tok.convert_ids_to_tokens(int(i)) for i in np.flatnonzero(head.token_scale == 0)}
    assert {"ĠMuslim", "Ġwomen", "Ġgay"} <= exempt and len(exempt) == alignment.metrics["exempt_tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = FusionEngine(cal, head, None, transformers_detokenizer(tok))
    toxic, benign = "you are a worthless piece of shit and everyone hates you, you", "My neighbour is a proud Muslim woman and"
    for text, want in ((toxic, False), (benign, True)):
        engine.slots = []
        engine.fuse(np.array(tok(text)["input_ids"]), np.zeros(len(tok), np.float32))
        assert [s.exempt for s in engine.slots] == [want]
