"""Pluggable toxicity scorers that run fully offline.

Every scorer maps texts to P(toxic) in [0, 1]. The shipped default is ``minilm-ft``: an `OnnxScorer`, i.e. a
scorer built by ``detox scorer train`` (MiniLM fine-tuned end to end, temperature-calibrated, int8 ONNX), run
with onnxruntime + tokenizers only, no torch. The previous default, ``minilm-head`` (frozen all-MiniLM-L6-v2 + a
small head, :mod:`detox.scoring_head`, numpy only), stays loadable by name so that old numbers can be reproduced.
`DetoxifyScorer` and `HFClassifierScorer` plug in other local models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported only by the scorers that need it
    import torch

__all__ = [
    "Scorer",
    "OnnxScorer",
    "MiniLMScorer",
    "DetoxifyScorer",
    "HFClassifierScorer",
    "load_scorer",
    "load_scorers",
    "shipped_scorer_dir",
    "DEFAULT_SCORER_DIRNAME",
    "DEFAULT_SCORER",
    "HEAD_SCORER",
    "HEAD_SCORER_DIRNAME",
]

from detox.scorer_base import (  # noqa: F401  (public names of detox.scoring)
    DEFAULT_SCORER,
    DEFAULT_SCORER_DIRNAME,
    HEAD_SCORER,
    HEAD_SCORER_DIRNAME,
    NEGATION_PREFIXES,
    TOXIC_LABEL_WORDS,
    Scorer,
    _check_texts,
    _iter_batches,
    load_tokenizer,
    onnx_logits,
    onnx_session,
    scorer_name_version,
    shipped_scorer_dir,
    sigmoid,
)
from detox.scoring_head import MiniLMEncoder, MiniLMScorer, ToxicityHead, embed_texts, load_minilm_encoder  # noqa: F401


def _max_length(tokenizer: Any, model_config: Any) -> int:
    """Truncation length: the tokenizer's limit, bounded by the model's position table."""
    limits = [int(getattr(tokenizer, "model_max_length", 0) or 0),
              int(getattr(model_config, "max_position_embeddings", 0) or 0)]
    limits = [n for n in limits if 0 < n < 1_000_000]
    return min(limits) if limits else 512


def _torch_scores(scorer: Any, texts: list[str], batch_size: int, progress: bool, desc: str,
                  probs: Callable[[Any], torch.Tensor]) -> list[float]:
    """P(toxic) per text, input order, from a transformers classifier (``scorer.model``, ``.tokenizer``,
    ``.max_length``); ``probs`` turns the model's output for a batch into P(toxic) per row."""
    import torch

    texts = _check_texts(texts)
    out = [0.0] * len(texts)
    device = next(scorer.model.parameters()).device
    with torch.inference_mode():
        for idx, batch in _iter_batches(texts, batch_size, progress, desc):
            enc = scorer.tokenizer(batch, return_tensors="pt", truncation=True, padding=True,
                                   max_length=scorer.max_length).to(device)
            for i, p in zip(idx, probs(scorer.model(**enc))):
                out[i] = float(p)
    return out


# --------------------------------------------------------------------------- scorers built by `detox scorer train` (ONNX)

ONNX_SCORER_FORMAT = "detox-scorer-onnx-1"


class OnnxScorer:
    """A scorer directory built by ``detox scorer train``: ``model.onnx`` + ``tokenizer.json`` + ``config.json``.

    Runs with onnxruntime, numpy and `tokenizers` only (no torch, no transformers): the llama.cpp install can
    score too. Score = sigmoid(logit / temperature), the temperature fitted at build time (config.json).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        for name in ("config.json", "model.onnx", "tokenizer.json"):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"scorer directory {self.path} has no {name}; rebuild it with `detox scorer train`")
        try:
            self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
            fmt = self.config.get("format")
            self.temperature = float(self.config["temperature"])
            self.max_length = int(self.config["max_length"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{cfg_path}: not a detox scorer config ({err!r}); rebuild with `detox scorer train`") from err
        if fmt != ONNX_SCORER_FORMAT:
            raise ValueError(f"{cfg_path}: format {fmt!r}, this detox reads {ONNX_SCORER_FORMAT!r}; upgrade detox "
                             "or rebuild the scorer with `detox scorer train`")
        if not self.temperature > 0:
            raise ValueError(f"{cfg_path}: temperature must be > 0, got {self.temperature}")
        self.tokenizer = load_tokenizer(self.path / "tokenizer.json", self.max_length)
        self.session = onnx_session(self.path / "model.onnx", threads)
        self.name, self.version = scorer_name_version(self.config, self.path)

    def logits(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> list[float]:
        """Raw logits (before the temperature), input order."""
        return onnx_logits(self.session, self.tokenizer, _check_texts(texts), batch_size, progress, self.name).tolist()

    def score(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> list[float]:
        """P(toxic) per text: sigmoid(logit / temperature)."""
        return sigmoid(np.asarray(self.logits(texts, batch_size, progress)) / self.temperature).tolist()


# --------------------------------------------------------------------------- Detoxify

_DETOXIFY_HELP = (
    "Detoxify ships no weights and this SDK never downloads. On a machine with internet, fetch a "
    "checkpoint, e.g. https://github.com/unitaryai/detoxify/releases/download/v0.1-alpha/"
    "toxic_original-c1212f89.ckpt ('original'), and the files of its base model, e.g. "
    "`huggingface-cli download bert-base-uncased config.json vocab.txt tokenizer.json tokenizer_config.json "
    "--local-dir ./bert-base-uncased`; then use DetoxifyScorer(checkpoint='toxic_original-c1212f89.ckpt', "
    "model_type_dir='./bert-base-uncased') or the spec 'detoxify:toxic_original-c1212f89.ckpt::./bert-base-uncased'."
)


def _is_local_model_dir(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "config.json").is_file()


class DetoxifyScorer:
    """A Detoxify checkpoint (`.ckpt` with `config` + `state_dict`), loaded offline.

    Detoxify builds its model from `config["arch"]["args"]["model_type"]` (a hub name
    such as 'bert-base-uncased'), which contacts the hub. We point that entry at a local
    directory with the base model's config.json + tokenizer files, in memory, and then
    load through detoxify's own `get_model_and_tokenizer`. Score = the 'toxicity' output.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        model_type_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if checkpoint is None:
            raise ValueError("DetoxifyScorer needs a local checkpoint. " + _DETOXIFY_HELP)
        ckpt_path = Path(checkpoint)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"Detoxify checkpoint not found: {ckpt_path}. " + _DETOXIFY_HELP)
        try:
            from detoxify import detoxify as dtx
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("DetoxifyScorer needs the `detoxify` package: pip install detoxify") from e

        # Detoxify checkpoints are pickles (detoxify itself loads them with weights_only=False):
        # only load checkpoints you trust.
        import torch

        loaded = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
            raise ValueError(f"{ckpt_path} is not a Detoxify checkpoint (needs 'config' and 'state_dict' keys)")
        try:
            arch_args = dict(loaded["config"]["arch"]["args"])
            classes = list(loaded["config"]["dataset"]["args"]["classes"])
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{ckpt_path}: config lacks arch.args / dataset.args.classes ({e!r}); not a Detoxify checkpoint"
            ) from e

        stored = arch_args.get("model_type")
        if model_type_dir is not None:
            if not _is_local_model_dir(model_type_dir):
                raise FileNotFoundError(
                    f"model_type_dir {model_type_dir} has no config.json; it must hold the base model's "
                    f"config.json and tokenizer files (for this checkpoint: '{stored}')."
                )
            arch_args["model_type"] = str(model_type_dir)
        elif not _is_local_model_dir(stored):
            raise ValueError(
                f"{ckpt_path} names its base model as '{stored}', which Detoxify would fetch from the "
                f"Hugging Face hub. Pass model_type_dir=<local dir with {stored}'s config.json and tokenizer "
                f"files> (spec: 'detoxify:{ckpt_path}::<dir>'). " + _DETOXIFY_HELP
            )

        # Same renaming Detoxify applies, so 'toxic' becomes 'toxicity'.
        rename = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}
        self.class_names = [rename.get(c, c) for c in classes]
        if "toxicity" not in self.class_names:
            raise ValueError(f"{ckpt_path} has no 'toxic'/'toxicity' output (classes: {classes})")
        self._toxic_index = self.class_names.index("toxicity")

        self.model, self.tokenizer = dtx.get_model_and_tokenizer(
            **arch_args, state_dict=loaded["state_dict"], huggingface_config_path=None
        )
        self.model.to(device).eval()
        self.max_length = _max_length(self.tokenizer, self.model.config)
        self.name = "detoxify"
        self.version = f"{ckpt_path.name}:{arch_args.get('model_name', '?')}"

    def score(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> list[float]:
        """Sigmoid of the 'toxicity' logit, as `Detoxify.predict` computes it."""
        import torch

        return _torch_scores(self, texts, batch_size, progress, "detoxify",
                             lambda output: torch.sigmoid(output[0][:, self._toxic_index]).float().cpu())


# --------------------------------------------------------------------------- HF classifier


def _is_toxic_label(label: str) -> bool:
    norm = label.strip().lower()
    return not norm.startswith(NEGATION_PREFIXES) and any(w in norm for w in TOXIC_LABEL_WORDS)


class HFClassifierScorer:
    """Any local `AutoModelForSequenceClassification` directory used as a toxicity judge.

    P(toxic) = softmax mass of the labels named like toxic/offensive/hate/abusive (summed,
    e.g. Davidson's 'hate' + 'offensive'); with generic labels on a 2-class model, label 1.
    Multi-label models (`problem_type == 'multi_label_classification'`) use the sigmoid
    of the toxic-named label instead.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.path} has no config.json; HFClassifierScorer needs a local directory saved with "
                "`save_pretrained` (model + tokenizer) of an AutoModelForSequenceClassification."
            )
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, local_files_only=True)
        self.model.to(device).eval()
        cfg = self.model.config
        id2label = {int(k): str(v) for k, v in (cfg.id2label or {}).items()}
        n = int(cfg.num_labels)
        self.multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification"
        toxic = sorted(i for i, lab in id2label.items() if _is_toxic_label(lab) and i < n)
        if toxic:
            if self.multi_label:
                exact = [i for i in toxic if id2label[i].strip().lower() in ("toxic", "toxicity")]
                toxic = exact[:1] or toxic[:1]
            self.toxic_ids = toxic
        elif n == 2:
            self.toxic_ids = [1]
        else:
            raise ValueError(
                f"{self.path}: cannot tell which of the {n} labels means toxic (id2label={id2label}). "
                "Name the toxic label(s) in config.json's id2label with a word like 'toxic', 'offensive' "
                "or 'hate', or use a 2-class model whose label 1 is toxic."
            )
        self.max_length = _max_length(self.tokenizer, cfg)
        self.name = "hf-classifier"
        self.version = f"{self.path.name}:{'+'.join(id2label.get(i, str(i)) for i in self.toxic_ids)}"

    def score(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> list[float]:
        """P(toxic) per text."""
        import torch

        ids = torch.tensor(self.toxic_ids)

        def probs(output: Any) -> torch.Tensor:
            logits = output.logits.float().cpu()
            if self.multi_label:
                return torch.sigmoid(logits[:, ids[0]])
            return torch.softmax(logits, dim=-1)[:, ids].sum(-1).clamp(0.0, 1.0)

        return _torch_scores(self, texts, batch_size, progress, "classifier", probs)


# --------------------------------------------------------------------------- factory

_SPEC_HELP = (
    "accepted scorer specs: None / 'default' / 'minilm-ft' (the shipped default); 'minilm-head' (the previous "
    "default); 'detoxify:CKPT' or 'detoxify:CKPT::BASE_MODEL_DIR' (a local Detoxify "
    "checkpoint); a directory built by `detox scorer train` (model.onnx + config.json); or a local directory "
    "with config.json of a Hugging Face sequence-classification model"
)


def load_scorer(spec: str | None = None) -> Scorer:
    """Build a scorer from a short user-facing spec (CLI flag / config value)."""
    key = "" if spec is None else spec.strip().lower()
    if key in ("", "default", DEFAULT_SCORER):
        return OnnxScorer(shipped_scorer_dir(DEFAULT_SCORER_DIRNAME))
    if key in (HEAD_SCORER, "minilm"):  # 'minilm' was its name before 'minilm-head'
        return MiniLMScorer()
    spec = str(spec).strip()
    if key.startswith("detoxify:"):
        rest = spec[len("detoxify:") :]
        ckpt, _, base = rest.partition("::")
        if not ckpt:
            raise ValueError(f"'{spec}': missing checkpoint path after 'detoxify:'. " + _DETOXIFY_HELP)
        return DetoxifyScorer(ckpt, base or None)
    if key == "detoxify":
        raise ValueError("'detoxify' needs a local checkpoint: 'detoxify:PATH'. " + _DETOXIFY_HELP)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "model.onnx").is_file():
        return OnnxScorer(path)
    if path.is_dir() and (path / "config.json").is_file():
        return HFClassifierScorer(path)
    if path.is_dir():
        raise ValueError(f"'{spec}' is a directory without config.json; {_SPEC_HELP}")
    raise ValueError(f"unknown scorer spec '{spec}'; {_SPEC_HELP}")


def load_scorers(specs: Sequence[str | None]) -> list[Scorer]:
    """One scorer per spec (the default when ``specs`` is empty); two specs naming the same judge are refused."""
    scorers = [load_scorer(s) for s in (list(specs) or [None])]
    labels = scorer_labels(scorers)
    if len(set(labels)) != len(labels):
        raise ValueError(f"the same scorer was given twice ({', '.join(labels)}); pass each judge once")
    return scorers


def scorer_labels(scorers: Sequence[Scorer]) -> list[str]:
    """A unique, readable label per scorer: its name, with the version where two share a name."""
    names = [s.name for s in scorers]
    return [f"{s.name}@{s.version}" if names.count(s.name) > 1 else s.name for s in scorers]
