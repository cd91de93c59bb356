"""Scorers: the shipped MiniLM default, Detoxify and HF-classifier loading paths (all offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from detox.scoring import (
    DetoxifyScorer,
    HFClassifierScorer,
    MiniLMScorer,
    Scorer,
    load_scorer,
    shipped_scorer_dir,
)

TOXIC = "you are a stupid idiot, I hate you"
BENIGN = "the weather is lovely today"
TEXTS = ["hello world", "the cat is a good cat", "you are bad", "a", "world cat hello good bad is you"]
VOCAB_WORDS = "hello world the cat is a good bad you are".split()
DETOXIFY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


# --------------------------------------------------------------------------- shipped default


@pytest.fixture(scope="module")
def minilm():
    return load_scorer(None)


def test_shipped_head_is_small_and_described():
    import json

    d = shipped_scorer_dir()
    assert (d / "head.safetensors").stat().st_size < 1_000_000
    cfg = json.loads((d / "config.json").read_text())
    for key in ("embedding_model", "heldout_metrics", "training", "version"):
        assert key in cfg
    assert len(cfg["training"]["data_sha256"]) == 64


def test_minilm_separates_clear_cases(minilm):
    assert isinstance(minilm, MiniLMScorer)
    assert isinstance(minilm, Scorer)
    toxic, benign = minilm.score([TOXIC, BENIGN])
    assert toxic > benign
    assert toxic > 0.5
    assert benign < 0.5


def test_minilm_batching_keeps_order_and_values(minilm):
    texts = [BENIGN, TOXIC, "a much longer sentence about gardening, tomatoes and the morning sun", "ok"]
    one_by_one = [minilm.score([t])[0] for t in texts]
    batched = minilm.score(texts, batch_size=3, progress=True)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in batched)
    assert minilm.score([]) == []
    with pytest.raises(TypeError, match="list of texts"):
        minilm.score(TOXIC)


@pytest.mark.parametrize("spec", ["default", "minilm", " MiniLM "])
def test_load_scorer_default_aliases(spec, monkeypatch):
    import detox.scoring as scoring

    monkeypatch.setattr(scoring, "MiniLMScorer", lambda: "minilm-instance")
    assert scoring.load_scorer(spec) == "minilm-instance"


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
