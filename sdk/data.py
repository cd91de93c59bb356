"""Read training text from the file formats users have: plain text (one document per line), JSONL, CSV."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

TEXT_FIELDS = ("text", "Text", "content", "sentence")


class DataFormatError(ValueError):
    """A data file could not be read; the message names the file and line."""


def read_texts(path: str | os.PathLike[str], field: str | None = None) -> list[str]:
    """Return the non-empty documents of a ``.txt`` (one per line), ``.jsonl`` or ``.csv`` file.

    JSONL/CSV rows use ``field`` or the first of ``text``, ``Text``, ``content``, ``sentence`` present.
    """
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p, field)
    if suffix == ".csv":
        return _read_csv(p, field)
    with p.open(encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _pick_field(keys: Iterable[str], field: str | None, where: str) -> str:
    keys = list(keys)
    if field is not None:
        if field not in keys:
            raise DataFormatError(f"{where}: no field {field!r} (fields: {keys}); pass --field NAME")
        return field
    for name in TEXT_FIELDS:
        if name in keys:
            return name
    raise DataFormatError(f"{where}: no text field among {keys}; expected one of {TEXT_FIELDS} or pass --field NAME")


def iter_jsonl(path: str | os.PathLike[str], skip_blank: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each line of a JSONL file; a bad line raises with its line number."""
    p = Path(path)
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                if skip_blank:
                    continue
                raise DataFormatError(f"{p}:{lineno}: empty line")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{p}:{lineno}: invalid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataFormatError(f"{p}:{lineno}: expected a JSON object per line")
            yield lineno, row


def _read_jsonl(p: Path, field: str | None) -> list[str]:
    texts = []
    for lineno, row in iter_jsonl(p):
        key = _pick_field(row.keys(), field, f"{p}:{lineno}")
        value = row[key]
        if not isinstance(value, str):
            raise DataFormatError(f"{p}:{lineno}: field {key!r} is not a string")
        if value.strip():
            texts.append(value.strip())
    return texts


def _read_csv(p: Path, field: str | None) -> list[str]:
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        key = _pick_field(reader.fieldnames or [], field, str(p))
        return [row[key].strip() for row in reader if row.get(key) and row[key].strip()]


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """One hash over the bytes of several files, in order: the training-data hash recorded in manifests."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
