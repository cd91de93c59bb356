"""What every toxicity scorer shares (the protocol, batching, the shipped scorers' folder), below the scorer
modules so that :mod:`detox.scoring` and :mod:`detox.scoring_head` both import it without a cycle."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol, Sequence, runtime_checkable

DEFAULT_SCORER = "minilm-head"
DEFAULT_SCORER_DIRNAME = "scorer-minilm"
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


def _length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Index batches of similar length: padding to the batch max is what costs CPU time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _iter_batches(
    texts: Sequence[str], batch_size: int, progress: bool, desc: str
) -> Iterator[tuple[list[int], list[str]]]:
    batches = _length_sorted_batches(texts, batch_size)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=desc, unit="text")
    for idx in batches:
        yield idx, [texts[i] for i in idx]
        if progress:
            bar.update(len(idx))
    if progress:
        bar.close()


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
