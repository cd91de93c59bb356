"""Matching two vocabularies by the text their tokens stand for (cross-tokenizer: by text, never by id).

Byte-level BPE (GPT-2's byte table) and SentencePiece (``▁``) entries are read back to text; a target token's
calibrator counterpart is the calibrator token its text starts with. ``detox align`` builds this map for every
fusion method and refuses a target it mostly cannot read (:func:`check_mapped_share`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte↔printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def token_surface(token: str | None, byte_level: bool) -> str | None:
    """The text a vocabulary entry stands for (``Ġthe`` / ``▁the`` → `` the``); None if not a whole string."""
    if not token:
        return None
    if byte_level:
        try:
            return bytes(BYTE_DECODER[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None
    if token.startswith("<") and token.endswith(">"):
        return None  # special / byte-fallback tokens like <0x0A>
    return token.replace("\u2581", " ")


def vocab_surfaces(tokens: list[str | None], special: set[str] = frozenset()) -> list[str | None]:
    firsts = [t[0] for t in tokens if t]  # byte-level BPE marks a leading space with Ġ, SentencePiece with ▁
    byte_level = firsts.count("Ġ") > firsts.count("\u2581")
    return [None if (t in special) else token_surface(t, byte_level) for t in tokens]


def shared_token_pairs(cal_tokens: list[str | None], target_tokens: list[str | None], target_special: set[str] = frozenset()) -> list[tuple[int, int]]:
    """``(calibrator id, target id)`` for every surface string present in both vocabularies."""
    target_index: dict[str, int] = {}
    for i, s in enumerate(vocab_surfaces(target_tokens, target_special)):
        if s and s not in target_index:
            target_index[s] = i
    cal_surfaces = vocab_surfaces(cal_tokens, {"<|endoftext|>"})
    return [(i, target_index[s]) for i, s in enumerate(cal_surfaces) if s in target_index]


def build_token_map(cal_tokenizer: Any, target_tokens: list[str | None], target_special: set[str] = frozenset()) -> tuple[np.ndarray, dict[str, float]]:
    """For contrast fusion: each target token's calibrator counterpart, the calibrator token its text starts with.

    Returns ``(map [vocab_target] int32 with -1 for special / partial-byte tokens, metrics)``; the metrics say how
    many target tokens have an exact counterpart (same text) and how many only a first piece.
    """
    surfaces = vocab_surfaces(target_tokens, target_special)
    present = [i for i, s in enumerate(surfaces) if s]
    out = np.full(len(target_tokens), -1, dtype=np.int32)
    exact = 0
    encode = getattr(cal_tokenizer, "encode_batch_fast", cal_tokenizer.encode_batch)  # fast: no offsets (>= 0.21)
    for b in range(0, len(present), 16384):  # in batches: 262k encodings at once hold ~300 MB
        batch = present[b : b + 16384]
        for i, enc in zip(batch, encode([surfaces[i] for i in batch], add_special_tokens=False)):
            if enc.ids:
                out[i] = enc.ids[0]
                exact += len(enc.ids) == 1
    mapped = int((out >= 0).sum())
    return out, {"token_map_exact": exact / len(out), "token_map_first_piece": (mapped - exact) / len(out),
                 "token_map_unmapped": 1 - mapped / len(out)}


def check_mapped_share(share: float, n_tokens: int, target: str, minimum: float) -> None:
    """Refuse a target whose vocabulary the calibrator mostly cannot read (share = 1 − ``token_map_unmapped``).

    An unmapped target token is never steered, and real targets map well above 90 % (docs/align.md), so a target below
    ``minimum`` is almost certainly the wrong model, and an artifact for it would change little while looking valid.
    """
    if share < minimum:
        raise ValueError(
            f"only {share:.1%} of the {n_tokens} tokens of {target} have text the calibrator can read (the rest are "
            f"special, byte-fragment or unreadable tokens), below the minimum mapped share {minimum:.0%}: the "
            "artifact would leave most of the target untouched. Check --target, or pass --min-mapped-share to accept it"
        )
