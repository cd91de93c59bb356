"""Read training text from the file formats users have: plain text (one document per line), JSONL, CSV."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from detox.faults import armed, fault_point, kill


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """One sha256 over the bytes of several files, in order, read in 1 MiB chunks (also the training-data hash that
    manifests record)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    return sha256_files([path])


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
    return [line.strip() for _, line in read_lines(p) if line.strip()]


def read_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each line of a UTF-8 file, newline kept; a UTF-8 byte-order mark is dropped.

    Every reader of a user's text file goes through here, so bytes that are not UTF-8 fail with the file and
    line (``open(encoding="utf-8")`` would raise an error that names neither).
    """
    p = Path(path)
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(f"{p}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                      f"{err.start + 1}); save the file as UTF-8") from None
            yield lineno, line


def parse_json_line(line: str, where: str) -> Any:
    """One JSON value; any way it can fail (syntax, nesting deeper than the parser's recursion limit, an integer
    with thousands of digits) becomes a :class:`DataFormatError` naming ``where`` (``file:line``)."""
    value, problem = _loads(line)
    if problem is not None:
        raise DataFormatError(f"{where}: {problem}")
    return value


def read_json_file(path: str | os.PathLike[str]) -> Any:
    """The JSON value a whole file holds (a settings file, a summary), or a :class:`DataFormatError` naming it."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataFormatError(f"{p}: not UTF-8 text") from None
    return parse_json_line(text, str(p))


def _loads(text: str) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, what is wrong)`` for text that is not one JSON value."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return None, "JSON nested too deeply to read"
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return None, f"invalid JSON ({err})"


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


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each line of a JSONL file; blank lines are skipped (every JSONL reader of
    detox follows this one rule) and a bad line raises with its line number."""
    p = Path(path)
    for lineno, line in read_lines(p):
        if not line.strip():
            continue
        row = parse_json_line(line, f"{p}:{lineno}")
        if not isinstance(row, dict):
            raise DataFormatError(f"{p}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        yield lineno, row


@dataclass
class TextRecord:
    """One text of a user's file: its ``id`` (the row's ``id`` field, or the 0-based line number) and line."""

    id: Any
    text: str
    lineno: int


def read_text_records(path: str | os.PathLike[str], field: str = "text", jsonl: bool = True,
                      fix: str = "pass --field NAME") -> list[TextRecord]:
    """The texts of a JSONL file (string field ``field``, optional ``id``, default: the 0-based line number) or, with
    ``jsonl=False``, of a plain text file: the one reader of ``detox eval``'s prompts and ``detox score``'s input.
    ``fix`` ends the message of a row without the field."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"file not found: {p}")
    if not jsonl:
        return [TextRecord(lineno - 1, line.rstrip("\r\n"), lineno) for lineno, line in read_lines(p) if line.strip()]
    records = []
    for lineno, row in iter_jsonl(p):
        if not isinstance(row.get(field), str):
            problem = (f"field {field!r} is not a string" if field in row else
                       f"no field {field!r} (fields: {', '.join(map(repr, sorted(row))) or 'none'})")
            raise DataFormatError(f"{p}:{lineno}: {problem}; {fix}")
        records.append(TextRecord(row.get("id", lineno - 1), row[field], lineno))
    return records


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
    lines = (line for _, line in read_lines(p))
    reader = csv.DictReader(lines)
    try:
        key = _pick_field(reader.fieldnames or [], field, str(p))
        return [row[key].strip() for row in reader if row.get(key) and row[key].strip()]
    except csv.Error as err:
        raise DataFormatError(f"{p}:{reader.line_num}: invalid CSV ({err})") from None


# ---------------------------------------------------------------- files that resumable runs append to
# (`detox eval`, `detox distill`; what a crash can leave and what a rerun guarantees: docs/security.md)


@dataclass
class ResumableRows:
    """What :func:`read_resumable_rows` found: the complete rows, and the torn bytes after them."""

    path: Path
    rows: list[dict[str, Any]]
    kept_bytes: int  # length of the prefix that holds ``rows``
    torn_bytes: int = 0  # bytes after it: the start of a line a killed run did not finish
    newline_missing: bool = False  # the last row is whole but its newline was not written


def read_resumable_rows(path: str | os.PathLike[str], check: Callable[[int, dict[str, Any]], str | None],
                        what: str = "run") -> ResumableRows:
    """Read the rows a resumable run appended to ``path`` (none if it does not exist) without changing the file.

    ``check(index, row)`` returns ``None`` for the row the run expects at ``index`` or says what is wrong; a complete
    line that is not such a row raises :class:`DataFormatError`. Bytes after the last newline are a torn write
    (``torn_bytes``), unless they are a whole valid row missing only its newline, which is kept.
    """
    p = Path(path)
    if not p.exists():
        return ResumableRows(p, [], 0)
    data = p.read_bytes()
    rows: list[dict[str, Any]] = []
    start = lineno = 0
    while start < len(data):
        end = data.find(b"\n", start)
        lineno += 1
        try:
            row, problem = _loads(data[start:end if end >= 0 else len(data)].decode("utf-8"))
        except UnicodeDecodeError:
            row, problem = None, "not UTF-8 text"
        if problem is None:
            problem = check(len(rows), row) if isinstance(row, dict) else "not a JSON object"
        if end < 0:  # the last line, without its newline
            if problem is None:
                return ResumableRows(p, rows + [row], len(data), newline_missing=True)
            return ResumableRows(p, rows, start, torn_bytes=len(data) - start)
        if problem is not None:
            raise DataFormatError(
                f"{p}:{lineno}: {problem}. This line is complete, so it is not what an interrupted {what} leaves "
                f"behind: the file was edited or belongs to another {what}. Nothing was changed; move the file away "
                f"or choose another output."
            )
        rows.append(row)
        start = end + 1
    return ResumableRows(p, rows, len(data))


def drop_torn_tail(found: ResumableRows, log: Callable[[str], None] | None = None) -> None:
    """Make the file hold exactly ``found.rows``, one per line (atomically): drop a torn tail, saying so to ``log``
    (default: a warning), or add the newline a whole last row lacks."""
    if not found.torn_bytes and not found.newline_missing:
        return
    kept = found.path.read_bytes()[: found.kept_bytes]
    write_bytes_atomic(found.path, kept + b"\n" if found.newline_missing else kept)
    if found.torn_bytes:
        (log or _warn)(f"{found.path}: dropped a torn last line ({found.torn_bytes} of "
                       f"{found.kept_bytes + found.torn_bytes} bytes; an interrupted run was writing it) and kept the "
                       f"{len(found.rows)} complete rows before it")


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def _fsync_dir(path: Path) -> None:
    """Make a file's creation or rename in ``path`` survive a power cut, not just a killed process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (after fsync): a crash leaves the old or the new file, whole
    (and perhaps the sibling ``.NAME.PID.tmp``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text (settings, manifests and summaries of resumable runs)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def jsonl_text(rows: list[dict[str, Any]]) -> str:
    """``rows`` as JSONL lines, the one format of every row file a resumable run appends to or rewrites."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def append_rows(path: Path, rows: list[dict[str, Any]], fault: str) -> None:
    """Append ``rows`` as JSONL lines in one write, then fsync: after this returns they survive a crash.
    ``fault`` names the :mod:`detox.faults` points around it (``FAULT.torn``: mid-write; ``FAULT.written``: after)."""
    data = jsonl_text(rows).encode("utf-8")
    created = not path.exists()
    with path.open("ab") as f:
        if armed(f"{fault}.torn"):  # stop halfway through the line that holds the middle byte
            start = data.rfind(b"\n", 0, len(data) // 2) + 1
            f.write(data[: start + (data.find(b"\n", start) - start) // 2])
            f.flush()
            os.fsync(f.fileno())
            kill()
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if created:
        _fsync_dir(path.parent)
    fault_point(f"{fault}.written")
