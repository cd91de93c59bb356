"""Artifact registries: a local or shared directory, or a Hugging Face Hub repository, holding ``.detox`` archives.

Layout (both kinds)::

    NAME/VERSION.detox    one immutable archive per published version
    index.json            name -> version -> {sha256, size, kind, target fingerprint, signer, ...}

A directory registry treats the archives as the truth: ``index.json`` records each archive's sha256 at push
time (pulls check it) and is derivable from the archives (``detox artifacts repair``). Under an exclusive lock a
push first records the version in the index, then publishes the archive by hard-linking a fully written
temporary file to its final name, which fails atomically if the name exists. So a visible archive always has
its record, two concurrent pushes of one version cannot both win, and a push killed at any point leaves
either nothing visible (at most an unused record, which readers ignore and the next write drops) or the
complete, recorded version; re-running the same push then converges (an identical archive is not an error).
The Hub registry commits archive + index in one commit made against the revision it read
(``parent_commit``), so a concurrent push makes the later commit fail.

Names and versions are validated with full matches before they become paths; an entry a registry cannot read
(an invalid name or version, an unreadable archive, a malformed index record) is skipped and reported, never a
reason to fail listing or pulling everything else, and ``detox artifacts rm`` can remove it.

The registry used by ``detox.wrap(model, calibrator="NAME@RANGE")`` and the CLI's default is
``$DETOX_REGISTRY``, else ``<cache root>/registry`` (``~/.cache/detox/registry``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import tempfile
import time
import urllib.parse
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detox.artifacts.archive import ARCHIVE_SUFFIX, pack, read_archive_head
from detox.artifacts.cache import add_blob, cache_root, unpack_cached
from detox.artifacts.manifest import Manifest, TargetFingerprint, is_artifact_name
from detox.artifacts.semver import Range, RangeError, is_version, sort_versions
from detox.artifacts.store import (
    ArtifactError, load_directory, parse_json, read_manifest, sha256_file, validation_summary,
)
from detox.faults import fault_point

INDEX_NAME = "index.json"
INDEX_FORMAT = 1
MAX_INDEX_BYTES = 64 << 20
_STALE_TMP_SECONDS = 24 * 3600


class RegistryError(ArtifactError):
    """A registry is unreachable, inconsistent, or does not hold what was asked for."""


class ConflictError(RegistryError):
    """Another push already published (or is publishing) this name and version."""


class RegistryWarning(UserWarning):
    """An entry of a registry was skipped because it cannot be read (the rest of the registry is still served)."""


def shell_quote(text: str) -> str:
    """``text`` as one shell word on one line (bash ``$'...'`` when it holds control characters such as a newline)."""
    if text.isprintable():
        return shlex.quote(text)
    out = []
    for c in text:
        if c in "\\'":
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" if ord(c) < 65536 else f"\\U{ord(c):08x}")
    return "$'" + "".join(out) + "'"


def _shown(path: Path) -> str:
    """A path for a one-line message (a name holding a newline is shown escaped)."""
    return str(path) if str(path).isprintable() else repr(str(path))


@dataclass
class Entry:
    """What a registry knows about one published version (without downloading it)."""

    name: str
    version: str
    kind: str
    size: int
    sha256: str | None = None
    target: dict[str, Any] | None = None
    signed_by: str | None = None
    created_at: str = ""
    description: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def fingerprint(self) -> TargetFingerprint | None:
        return TargetFingerprint.model_validate(self.target) if self.target else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Record(BaseModel):
    """One version's record in ``index.json``, validated before use (the index is as untrusted as the archives)."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    version: str | None = None
    kind: Literal["calibrator", "aligned"]
    size: int = Field(ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    target: TargetFingerprint | None = None
    signed_by: str | None = Field(default=None, max_length=128)
    created_at: str = Field(default="", max_length=64)
    description: str = ""


Records = dict[str, dict[str, Entry]]


def parse_index(data: bytes, where: str) -> tuple[Records, list[str]]:
    """Validate ``index.json`` bytes: (the valid records, one line per record that had to be skipped).

    A file that is not an index at all (not JSON, nested too deeply, no ``artifacts`` object, a newer format)
    raises :class:`RegistryError`.
    """
    try:
        raw = parse_json(data, where)
    except ArtifactError as err:
        raise RegistryError(str(err)) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("artifacts"), dict):
        raise RegistryError(f"{where} is malformed: it must be a JSON object with an \"artifacts\" object")
    if raw.get("format", INDEX_FORMAT) != INDEX_FORMAT:
        raise RegistryError(f"{where} has index format {raw.get('format')!r}; this detox reads format {INDEX_FORMAT} (upgrade detox)")
    records: Records = {}
    problems: list[str] = []
    for name, versions in raw["artifacts"].items():
        if not is_artifact_name(name):
            problems.append(f"{where}: record name {name!r} is not a valid artifact name")
            continue
        if not isinstance(versions, dict):
            problems.append(f"{where}: {name!r} maps to a {type(versions).__name__}, not an object of versions")
            continue
        for version, record in versions.items():
            if not is_version(version):
                problems.append(f"{where}: {name}@{version!r}: not a semantic version")
                continue
            try:
                rec = _Record.model_validate(record, strict=True)
            except ValidationError as err:
                problems.append(f"{where}: the record of {name}@{version} is malformed ({validation_summary(err)})")
                continue
            if (rec.name or name, rec.version or version) != (name, version):
                problems.append(f"{where}: the record of {name}@{version} names {rec.name}@{rec.version}")
                continue
            fields = rec.model_dump(exclude={"name", "version"})
            records.setdefault(name, {})[version] = Entry(name=name, version=version, **fields)
    return records, problems


def render_index(records: Records) -> bytes:
    arts = {n: {v: e.to_json() for v, e in vs.items()} for n, vs in sorted(records.items()) if vs}
    return (json.dumps({"format": INDEX_FORMAT, "artifacts": arts}, indent=2, sort_keys=True) + "\n").encode()


def _summary(manifest: Manifest, size: int, sha256: str | None, signature: bytes | None) -> Entry:
    signed_by = None
    if signature:
        try:
            doc = parse_json(signature, "signature")
            signed_by = doc.get("key_id") if isinstance(doc, dict) and isinstance(doc.get("key_id"), str) else "malformed"
        except ArtifactError:
            signed_by = "malformed"
    target = manifest.alignment.target.model_dump() if manifest.alignment else None
    return Entry(manifest.name, manifest.version, manifest.kind, size, sha256, target, signed_by,
                 manifest.created_at.isoformat(), manifest.description)


def parse_ref(ref: str) -> tuple[str, Range]:
    """``NAME``, ``NAME@1.2.3`` or ``NAME@^1.2`` into a name and a semver range (``latest`` when omitted)."""
    name, _, spec = ref.partition("@")
    if not is_artifact_name(name):
        raise RegistryError(f"{ref!r} is not NAME[@VERSION_RANGE]; names are lower-case letters, digits, '.', '_', '-'")
    try:
        return name, Range.parse(spec or "*")
    except RangeError as err:
        raise RegistryError(f"{ref!r}: {err}") from err


def looks_like_ref(text: str) -> bool:
    """True for ``NAME@RANGE`` strings (used by ``detox.wrap`` when the string is not an existing path)."""
    name, sep, _ = text.partition("@")
    return bool(sep) and is_artifact_name(name)


def _default_warn(message: str) -> None:
    warnings.warn(message, RegistryWarning, stacklevel=4)


class Registry:
    """Operations shared by every registry kind; subclasses provide storage.

    ``warn`` receives one line per entry that is skipped because it cannot be read (default: a
    :class:`RegistryWarning`; the CLI prints it to stderr).
    """

    url: str
    warn: Callable[[str], None] = staticmethod(_default_warn)  # type: ignore[assignment]

    def _report(self, message: str) -> None:
        seen = self.__dict__.setdefault("_reported", set())
        if message not in seen:
            seen.add(message)
            self.warn(message)

    def _rm_hint(self, name: str, version: str) -> str:
        return f"detox artifacts rm {shell_quote(f'{name}@{version}')} --registry {shell_quote(self.url)}"

    def names(self) -> list[str]:
        raise NotImplementedError

    def versions(self, name: str) -> list[str]:
        """Published versions of ``name``, newest first (entries with invalid versions are skipped and reported)."""
        raise NotImplementedError

    def entry(self, name: str, version: str) -> Entry:
        raise NotImplementedError

    def publish(self, archive: Path, entry: Entry) -> bool:
        """Make ``archive`` (a complete file inside :meth:`staging_dir`) visible as ``entry``: True when published,
        False when exactly these bytes already were (a retried push); ConflictError for other bytes."""
        raise NotImplementedError

    def staging_dir(self) -> Path:
        """Where pushes build archives: a killed push leaves its partial file here, never under a visible name."""
        path = cache_root() / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def local_archive(self, entry: Entry) -> Path:
        """A local path holding the archive bytes of ``entry`` (may download)."""
        raise NotImplementedError

    def remove(self, name: str, version: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ shared logic

    def entries(self, name: str | None = None) -> list[Entry]:
        """Every readable entry (of ``name``), newest version first; unreadable ones are skipped and reported."""
        out = []
        for n in [name] if name else self.names():
            for v in self.versions(n):
                try:
                    out.append(self.entry(n, v))
                except ArtifactError as err:
                    self._report(f"skipping {n}@{v}: {err}; remove it with: {self._rm_hint(n, v)}")
        return out

    def resolve(self, ref: str, fingerprint: TargetFingerprint | None = None) -> Entry:
        """The newest readable version in range (that is aligned to ``fingerprint``, when given)."""
        name, rng = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"{name} is not in registry {self.url}; see what is: detox artifacts list --registry {self.url}")
        in_range = [v for v in versions if rng.matches(v)]
        if not in_range:
            raise RegistryError(f"no version of {name} in {self.url} matches {rng} (available: {', '.join(versions)})")
        seen, unreadable = [], []
        for v in in_range:
            try:
                e = self.entry(name, v)
            except ArtifactError as err:
                self._report(f"skipping {name}@{v}: {err}; remove it with: {self._rm_hint(name, v)}")
                unreadable.append(v)
                continue
            if fingerprint is None:
                return e
            fp = e.fingerprint()
            if e.kind == "aligned" and fp is not None and fp.same_model(fingerprint):
                return e
            seen.append(f"{v} ({'aligned to ' + (fp.name or 'another model') if fp else 'unaligned'})")
        if not seen:
            raise RegistryError(f"no readable version of {name}@{rng} in {self.url} (unreadable: {', '.join(unreadable)}); "
                                f"see: detox artifacts list {name} --registry {self.url}")
        assert fingerprint is not None
        raise RegistryError(
            f"no version of {name}@{rng} in {self.url} is aligned to this model ({fingerprint.name or 'unnamed'}); "
            f"found: {', '.join(seen)}. Align one and push it: detox align --target YOUR_MODEL --calibrator ART "
            f"--out ALIGNED --version NEW_VERSION && detox artifacts push ALIGNED"
        )

    def push(self, path: str | os.PathLike[str], require_signature: Any = None) -> tuple[Entry, bool]:
        """Validate an artifact (directory or ``.detox``) fully, then publish it; a published version is immutable.

        Returns (entry, published): ``published`` is False when the registry already held exactly these bytes
        under this name and version (re-running a push, e.g. after it was killed, converges instead of failing).
        """
        path = Path(path)
        if require_signature is not None:
            from detox.artifacts.signing import verify_signature

            verify_signature(path, require_signature)
        src = unpack_cached(path) if path.is_file() else path
        load_directory(src)  # exact files, every sha256, safetensors parse: never publish something unloadable
        manifest = read_manifest(src)
        work = Path(tempfile.mkdtemp(prefix="push-", dir=self.staging_dir()))
        try:
            archive = pack(src, work / f"{manifest.version}{ARCHIVE_SUFFIX}")
            _, signature = read_archive_head(archive)
            entry = _summary(manifest, archive.stat().st_size, sha256_file(archive), signature)
            fault_point("push:staged")
            published = self.publish(archive, entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return entry, published

    def pull(self, ref: str, fingerprint: TargetFingerprint | None = None) -> tuple[Entry, Path, Path]:
        """Resolve ``ref``, fetch it into the content-addressed cache, validate it; return (entry, archive, directory)."""
        entry = self.resolve(ref, fingerprint)
        if entry.sha256 is None:
            self._report(f"{entry.ref} has no sha256 record in {self.url}/{INDEX_NAME} (pushed by hand or by an older "
                         f"detox); record it with: detox artifacts repair --registry {shell_quote(self.url)}")
        blob = _cached(entry) or add_blob(self.local_archive(entry), entry.sha256)
        directory = unpack_cached(blob)
        m = read_manifest(directory)
        if (m.name, m.version) != (entry.name, entry.version):
            raise RegistryError(f"{self.url}: {entry.name}/{entry.version}{ARCHIVE_SUFFIX} holds {m.name}@{m.version}; "
                                "the registry is inconsistent (ask its owner to remove that file)")
        return entry, blob, directory


def _cached(entry: Entry) -> Path | None:
    from detox.artifacts.cache import blob_path

    return blob_path(entry.sha256) if entry.sha256 and blob_path(entry.sha256).is_file() else None


def _conflict_message(url: str, name: str, version: str) -> str:
    return (f"{name}@{version} already exists in {url} with other contents; published versions are immutable. "
            f"Bump the version (e.g. detox align ... --version X.Y.Z) or remove it first: detox artifacts rm {name}@{version}")


# ---------------------------------------------------------------- directory registry


class DirectoryRegistry(Registry):
    """A registry in a local or shared (NFS, SMB) directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)
        self._index_cache: tuple[Any, Records] | None = None

    # ------------------------------------------------------------ what is there

    def _name_dirs(self) -> Iterator[Path]:
        """Every directory that may hold archives (hidden ones, like .tmp, are the registry's own)."""
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if not p.name.startswith(".") and p.is_dir() and not p.is_symlink():
                yield p

    def _archives_in(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.name.endswith(ARCHIVE_SUFFIX) and not p.name.startswith("."))

    def names(self) -> list[str]:
        out = []
        for p in self._name_dirs():
            if is_artifact_name(p.name):
                if self.versions(p.name):
                    out.append(p.name)
                continue
            for a in self._archives_in(p):
                self._report(f"skipping {_shown(a)}: {p.name!r} is not a valid artifact name; remove it with: "
                             f"{self._rm_hint(p.name, a.name[: -len(ARCHIVE_SUFFIX)])}")
        return out

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not is_artifact_name(name) or not folder.is_dir():
            return []
        found = []
        for p in self._archives_in(folder):
            version = p.name[: -len(ARCHIVE_SUFFIX)]
            if is_version(version):
                found.append(version)
            else:
                self._report(f"skipping {_shown(p)}: {version!r} is not a semantic version; remove it with: "
                             f"{self._rm_hint(name, version)}")
        return sort_versions(found)

    def _archive(self, name: str, version: str) -> Path:
        """The path of NAME/VERSION.detox, built only from validated strings."""
        if not is_artifact_name(name):
            raise RegistryError(f"invalid artifact name {name!r}")
        if not is_version(version):
            raise RegistryError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        return self.root / name / f"{version}{ARCHIVE_SUFFIX}"

    def _find_literal(self, name: str, version: str) -> Path | None:
        """An existing archive whose directory and file name are exactly ``name`` and ``version`` + .detox, found by
        listing (so an invalid name can be removed, and no path is ever built from it)."""
        for folder in self._name_dirs():
            if folder.name == name:
                for p in self._archives_in(folder):
                    if p.name == f"{version}{ARCHIVE_SUFFIX}":
                        return p
        return None

    def find_listed(self, ref: str) -> tuple[str, str] | None:
        """(directory, version) of an existing archive named exactly ``ref`` = ``DIR@VERSION`` as a skip warning printed
        it, even when DIR or VERSION is invalid (any '@' may be the separator); None if there is none."""
        for i, c in enumerate(ref):
            if c == "@" and self._find_literal(ref[:i], ref[i + 1:]) is not None:
                return ref[:i], ref[i + 1:]
        return None

    # ------------------------------------------------------------ the index

    def _read_records(self, strict: bool) -> Records:
        """Records of index.json (empty if there is none). ``strict`` (writers): any problem raises RegistryError;
        otherwise (readers) problems are reported and the valid records used."""
        path = self.root / INDEX_NAME
        try:
            st = path.stat()
            if st.st_size > MAX_INDEX_BYTES:
                raise RegistryError(f"{path} is larger than {MAX_INDEX_BYTES} bytes; refusing to parse it")
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if not strict and self._index_cache is not None and self._index_cache[0] == key:
                return self._index_cache[1]
            records, problems = parse_index(path.read_bytes(), str(path))
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise RegistryError(f"cannot read {path}: {err.strerror or err}") from None
        except RegistryError as err:
            if strict:
                raise RegistryError(f"{err}; rebuild it from the archives: detox artifacts repair --registry "
                                    f"{shell_quote(self.url)}") from None
            self._report(f"{err}; sha256 records are unavailable until it is rebuilt: detox artifacts repair "
                         f"--registry {shell_quote(self.url)}")
            return {}
        if problems and strict:
            raise RegistryError(f"{problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
                                + f"; repair the index: detox artifacts repair --registry {shell_quote(self.url)}")
        for line in problems:
            self._report(f"{line}; skipping it (detox artifacts repair --registry {shell_quote(self.url)} rebuilds the index)")
        self._index_cache = (key, records)
        return records

    def _write_records(self, records: Records) -> None:
        _atomic_write(self.root / INDEX_NAME, render_index(records), self._tmpdir())
        self._index_cache = None
        fault_point("index:written")

    def _present(self) -> dict[tuple[str, str], Path]:
        """Every archive with a valid name and version (the truth the index describes)."""
        out = {}
        for folder in self._name_dirs():
            if is_artifact_name(folder.name):
                for p in self._archives_in(folder):
                    version = p.name[: -len(ARCHIVE_SUFFIX)]
                    if is_version(version) and p.is_file():
                        out[(folder.name, version)] = p
        return out

    def _derive(self, path: Path, name: str, version: str) -> Entry:
        """An index record made from the archive itself (for archives that have none)."""
        manifest, signature = read_archive_head(path)
        if (manifest.name, manifest.version) != (name, version):
            raise RegistryError(f"{path} holds {manifest.name}@{manifest.version}, not {name}@{version}")
        return _summary(manifest, path.stat().st_size, sha256_file(path), signature)

    def _sync(self, records: Records, keep: set[tuple[str, str]] = frozenset()) -> list[str]:
        """Bring ``records`` in line with the archives present: drop records whose archive is gone (except ``keep``,
        being published), and derive the missing ones. Returns one line per change."""
        present, changes = self._present(), []
        for name in list(records):
            for version in list(records[name]):
                if (name, version) not in present and (name, version) not in keep:
                    del records[name][version]
                    changes.append(f"dropped the record of {name}@{version} (no archive)")
            if not records[name]:
                del records[name]
        for (name, version), path in sorted(present.items()):
            if version not in records.get(name, {}):
                try:
                    records.setdefault(name, {})[version] = self._derive(path, name, version)
                    changes.append(f"recorded {name}@{version} from its archive")
                except ArtifactError as err:
                    self._report(f"skipping {name}@{version}: {err}; remove it with: {self._rm_hint(name, version)}")
                if not records[name]:
                    del records[name]
        return changes

    def entry(self, name: str, version: str) -> Entry:
        path = self._archive(name, version)
        if not path.is_file():
            if path.exists():
                raise RegistryError(f"{path} is not a regular file")
            raise RegistryError(f"{name}@{version} is not in {self.url}")
        manifest, signature = read_archive_head(path)
        if (manifest.name, manifest.version) != (name, version):
            raise RegistryError(f"{path} holds {manifest.name}@{manifest.version}, not {name}@{version}: the registry is "
                                "inconsistent (files were moved by hand); remove that file")
        recorded = self._read_records(strict=False).get(name, {}).get(version)
        return _summary(manifest, path.stat().st_size, recorded.sha256 if recorded else None, signature)

    # ------------------------------------------------------------ changes

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive lock for publishing, removing and index rewrites (released by the kernel if the holder dies).

        Not re-entrant: take it once per operation.
        """
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _tmpdir(self) -> Path:
        tmp = self.root / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for p in tmp.iterdir():  # leftovers of killed pushes: invisible, and cleaned up a day later
            try:
                if now - p.lstat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass
        return tmp

    def staging_dir(self) -> Path:
        return self._tmpdir()  # same filesystem as the final names, so publishing is a link, not a copy

    def publish(self, archive: Path, entry: Entry) -> bool:
        final = self._archive(entry.name, entry.version)
        with self._lock():
            records = self._read_records(strict=True)  # a malformed index refuses the push before anything is visible
            if final.exists() or final.is_symlink():
                if not final.is_file() or sha256_file(final) != entry.sha256:
                    raise ConflictError(_conflict_message(self.url, entry.name, entry.version))
                if self._sync(records):  # the same bytes are already published: make sure they are recorded
                    self._write_records(records)
                return False
            # record first, then publish: a visible archive is never unrecorded; a record without its archive
            # (a push killed between the two steps) is ignored by readers and dropped by the next write
            records.setdefault(entry.name, {})[entry.version] = entry
            self._sync(records, keep={(entry.name, entry.version)})
            self._write_records(records)  # (fault point "index:written": recorded, not yet visible)
            final.parent.mkdir(parents=True, exist_ok=True)
            _link_exclusive(archive, final, self.url)
            _fsync_dir(final.parent)
            fault_point("push:published")
        return True

    def local_archive(self, entry: Entry) -> Path:
        path = self._archive(entry.name, entry.version)
        if not path.is_file():
            raise RegistryError(f"{entry.ref} is not in {self.url} (removed meanwhile?)")
        return path

    def remove(self, name: str, version: str) -> None:
        """Remove NAME@VERSION; an entry with an invalid name or version (as printed when it was skipped) is found by
        listing the registry, so it can be removed too."""
        with self._lock():
            valid = is_artifact_name(name) and is_version(version)
            final = self._archive(name, version) if valid else self._find_literal(name, version)
            if final is None or not (final.is_file() or final.is_symlink()):
                raise RegistryError(f"{shell_quote(f'{name}@{version}')} is not in {self.url}; see: detox artifacts list "
                                    f"--registry {shell_quote(self.url)}")
            doomed = self._tmpdir() / f"removed-{os.getpid()}-{time.time_ns()}{ARCHIVE_SUFFIX}"
            os.rename(final, doomed)  # disappears atomically; then delete at leisure
            doomed.unlink(missing_ok=True)
            fault_point("rm:unlinked")
            try:
                final.parent.rmdir()
            except OSError:
                pass
            try:
                records = self._read_records(strict=True)
            except RegistryError as err:  # the archive is gone either way; a stale record is ignored by readers
                self._report(f"removed {name}@{version}, but {err}")
                return
            if valid and version in records.get(name, {}):
                del records[name][version]
                if not records[name]:
                    del records[name]
                self._write_records(records)

    def repair(self) -> list[str]:
        """Rebuild ``index.json`` from the archives present; return one line per change or problem.

        Keeps every valid record whose archive is present (and reports archives whose bytes no longer match their
        record: pulls refuse those), derives records for archives that have none, drops records without an
        archive and unreadable records. A malformed index is kept beside the new one as ``.index.json.corrupt-*``.
        """
        lines: list[str] = []
        warn, self.warn = self.warn, lines.append  # type: ignore[method-assign]  # collect, don't print
        self.__dict__["_reported"] = set()
        try:
            with self._lock():
                path = self.root / INDEX_NAME
                records: Records = {}
                if path.is_file():
                    try:
                        records, problems = parse_index(path.read_bytes(), str(path))
                        lines += [f"{p}: dropped" for p in problems]
                    except (RegistryError, OSError) as err:
                        keep = self.root / f".{INDEX_NAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
                        shutil.copyfile(path, keep)
                        lines.append(f"{err}; rebuilt from the archives (the old file is kept as {keep.name})")
                for (name, version), p in sorted(self._present().items()):
                    rec = records.get(name, {}).get(version)
                    if rec is not None and rec.sha256 is None:
                        del records[name][version]  # derived again below, with its sha256
                    elif rec is not None and sha256_file(p) != rec.sha256:
                        lines.append(f"{p} does not match its recorded sha256 (changed after it was published), so "
                                     f"pulls refuse it; remove it with: {self._rm_hint(name, version)}")
                lines += self._sync(records)
                self.names()  # reports archives with invalid names or versions, with the command that removes each
                self._write_records(records)
        finally:
            self.warn = warn  # type: ignore[method-assign]
        return lines


def _link_exclusive(tmp: Path, final: Path, url: str) -> None:
    """Make ``tmp`` visible as ``final`` only if ``final`` does not exist (atomic even on NFS). The caller holds the
    registry lock, which also makes the fallback for filesystems without hard links (check, then rename) safe."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ConflictError(_conflict_message(url, final.parent.name, final.name[: -len(ARCHIVE_SUFFIX)])) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if final.exists():
            raise ConflictError(_conflict_message(url, final.parent.name, final.name[: -len(ARCHIVE_SUFFIX)])) from None
        os.rename(tmp, final)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, tmpdir: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".partial", dir=tmpdir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------- Hugging Face Hub registry


class HubRegistry(Registry):
    """A registry in a Hugging Face Hub model repository (``hf://ORG/REPO[@BRANCH]``); needs network and a token to push."""

    def __init__(self, repo_id: str, revision: str = "main", api: Any = None) -> None:
        self.api, self.repo_id, self.revision = api or _default_hub_api(), repo_id, revision
        self.url = f"hf://{repo_id}" + (f"@{revision}" if revision != "main" else "")
        self._head: str | None = None
        self._cached: tuple[Records, list[str]] | None = None

    def _snapshot(self, refresh: bool = False, strict: bool = False) -> tuple[str | None, Records]:
        """(commit sha, validated records) of the branch; read once per registry object unless ``refresh``.
        Records that cannot be read are reported and skipped; ``strict`` (writers) refuses an index that has any."""
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        if self._cached is None or refresh:
            try:
                head = self.api.repo_info(self.repo_id, revision=self.revision, repo_type="model").sha
            except (RepositoryNotFoundError, RevisionNotFoundError):
                head, parsed = None, ({}, [])
            else:
                try:
                    local = self.api.hf_hub_download(self.repo_id, INDEX_NAME, revision=head, repo_type="model",
                                                     cache_dir=str(cache_root() / "hf"))
                    parsed = parse_index(Path(local).read_bytes(), f"{self.url}/{INDEX_NAME}")
                except EntryNotFoundError:
                    parsed = ({}, [])
            self._head, self._cached = head, parsed
        records, problems = self._cached
        if problems and strict:
            raise RegistryError(f"{problems[0]}; fix {INDEX_NAME} in {self.url} (remove that record) before changing the registry")
        for line in problems:
            self._report(f"{line}; skipping it")
        return self._head, records

    def names(self) -> list[str]:
        return sorted(n for n, vs in self._snapshot()[1].items() if vs)

    def versions(self, name: str) -> list[str]:
        return sort_versions(self._snapshot()[1].get(name, {}))

    def entry(self, name: str, version: str) -> Entry:
        record = self._snapshot()[1].get(name, {}).get(version)
        if record is None:
            raise RegistryError(f"{name}@{version} is not in {self.url}")
        return record

    def _commit(self, operations: list[Any], head: str | None, message: str, ref: str) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            if head is None:
                self.api.create_repo(self.repo_id, repo_type="model", private=True, exist_ok=True)
            self.api.create_commit(self.repo_id, operations, commit_message=message, repo_type="model",
                                   revision=self.revision, parent_commit=head)
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in (409, 412):
                raise ConflictError(f"{self.url} changed while {ref} was being pushed (another push?); "
                                    f"check with: detox artifacts list --registry {self.url}, then retry") from err
            raise RegistryError(f"{self.url}: the Hub refused the change: {err}") from err
        finally:
            self._cached = None

    def publish(self, archive: Path, entry: Entry) -> bool:
        from huggingface_hub import CommitOperationAdd

        head, records = self._snapshot(refresh=True, strict=True)
        existing = records.get(entry.name, {}).get(entry.version)
        if existing is not None:
            if existing.sha256 == entry.sha256:
                return False  # a retried push of the same bytes: already published and indexed (one commit)
            raise ConflictError(_conflict_message(self.url, entry.name, entry.version))
        records = {n: dict(vs) for n, vs in records.items()}
        records.setdefault(entry.name, {})[entry.version] = entry
        ops = [CommitOperationAdd(f"{entry.name}/{entry.version}{ARCHIVE_SUFFIX}", str(archive)),
               CommitOperationAdd(INDEX_NAME, render_index(records))]
        self._commit(ops, head, f"detox: push {entry.ref}", entry.ref)
        return True

    def local_archive(self, entry: Entry) -> Path:
        head, _ = self._snapshot()
        return Path(self.api.hf_hub_download(self.repo_id, f"{entry.name}/{entry.version}{ARCHIVE_SUFFIX}",
                                             revision=head, repo_type="model", cache_dir=str(cache_root() / "hf")))

    def remove(self, name: str, version: str) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        head, records = self._snapshot(refresh=True, strict=True)
        if version not in records.get(name, {}):
            raise RegistryError(f"{name}@{version} is not in {self.url}")
        records = {n: {v: e for v, e in vs.items() if (n, v) != (name, version)} for n, vs in records.items()}
        ops = [CommitOperationDelete(f"{name}/{version}{ARCHIVE_SUFFIX}"),
               CommitOperationAdd(INDEX_NAME, render_index(records))]
        self._commit(ops, head, f"detox: remove {name}@{version}", f"{name}@{version}")


def _default_hub_api() -> Any:
    """The real client (token from ``HF_TOKEN`` or ``huggingface-cli login``); tests replace this with a fake."""
    from huggingface_hub import HfApi

    return HfApi()


# ---------------------------------------------------------------- opening


def default_registry_url() -> str:
    return os.environ.get("DETOX_REGISTRY") or str(cache_root() / "registry")


def open_registry(url: str | os.PathLike[str] | None = None) -> Registry:
    """A registry from a directory path, ``file://PATH``, or ``hf://ORG/REPO[@BRANCH]`` (default: ``$DETOX_REGISTRY``)."""
    text = str(url) if url else default_registry_url()
    if text.startswith("hf://"):
        repo, _, revision = text[len("hf://"):].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise RegistryError(f"{text!r}: Hub registries are hf://ORG/REPO (optionally @BRANCH)")
        return HubRegistry(repo, revision or "main")
    if text.startswith("file://"):
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise RegistryError(f"{text!r}: file:// URLs must name a local path (file:///abs/path); mount shares first")
        return DirectoryRegistry(urllib.parse.unquote(parsed.path))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise RegistryError(f"unsupported registry {text!r}; use a directory path, file:///PATH or hf://ORG/REPO")
    return DirectoryRegistry(text)
