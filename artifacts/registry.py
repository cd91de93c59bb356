"""Artifact registries: a local or shared directory, or a Hugging Face Hub repository, holding ``.detox`` archives.

Layout (both kinds)::

    NAME/VERSION.detox    one immutable archive per published version
    index.json            name -> version -> {sha256, size, kind, target fingerprint, signer, ...}

A directory registry treats the archives as the truth (``index.json`` is a convenience for people and tools,
rewritten under a lock); a version is published by hard-linking a fully written temporary file to its final
name, which fails atomically if the name exists, so two concurrent pushes of one version cannot both win
and a killed push leaves nothing visible. The Hub registry commits archive + index in one commit made
against the revision it read (``parent_commit``), so a concurrent push makes the later commit fail.

The registry used by ``detox.wrap(model, calibrator="NAME@RANGE")`` and the CLI's default is
``$DETOX_REGISTRY``, else ``<cache root>/registry`` (``~/.cache/detox/registry``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from detox.artifacts.archive import ARCHIVE_SUFFIX, pack, read_archive_head
from detox.artifacts.cache import add_blob, cache_root, unpack_cached
from detox.artifacts.manifest import Manifest, TargetFingerprint
from detox.artifacts.semver import Range, RangeError, Version, sort_versions
from detox.artifacts.store import ArtifactError, load_artifact, read_manifest, sha256_file

INDEX_NAME = "index.json"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_STALE_TMP_SECONDS = 24 * 3600


class RegistryError(ArtifactError):
    """A registry is unreachable, inconsistent, or does not hold what was asked for."""


class ConflictError(RegistryError):
    """Another push already published (or is publishing) this name and version."""


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


def _summary(manifest: Manifest, size: int, sha256: str | None, signature: bytes | None) -> Entry:
    signed_by = None
    if signature:
        try:
            signed_by = json.loads(signature).get("key_id")
        except (ValueError, AttributeError):
            signed_by = "malformed"
    target = manifest.alignment.target.model_dump() if manifest.alignment else None
    return Entry(manifest.name, manifest.version, manifest.kind, size, sha256, target, signed_by,
                 manifest.created_at.isoformat(), manifest.description)


def parse_ref(ref: str) -> tuple[str, Range]:
    """``NAME``, ``NAME@1.2.3`` or ``NAME@^1.2`` into a name and a semver range (``latest`` when omitted)."""
    name, _, spec = ref.partition("@")
    if not _NAME.match(name):
        raise RegistryError(f"{ref!r} is not NAME[@VERSION_RANGE]; names are lower-case letters, digits, '.', '_', '-'")
    try:
        return name, Range.parse(spec or "*")
    except RangeError as err:
        raise RegistryError(f"{ref!r}: {err}") from err


def looks_like_ref(text: str) -> bool:
    """True for ``NAME@RANGE`` strings (used by ``detox.wrap`` when the string is not an existing path)."""
    name, sep, _ = text.partition("@")
    return bool(sep) and bool(_NAME.match(name))


class Registry:
    """Operations shared by every registry kind; subclasses provide storage."""

    url: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def versions(self, name: str) -> list[str]:
        """Published versions of ``name``, newest first."""
        raise NotImplementedError

    def entry(self, name: str, version: str) -> Entry:
        raise NotImplementedError

    def publish(self, archive: Path, entry: Entry) -> None:
        """Make ``archive`` (a complete file inside :meth:`staging_dir`) visible as ``entry``, or raise ConflictError."""
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

    def resolve(self, ref: str, fingerprint: TargetFingerprint | None = None) -> Entry:
        """The newest version in range (that is aligned to ``fingerprint``, when given)."""
        name, rng = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"{name} is not in registry {self.url}; see what is: detox artifacts list --registry {self.url}")
        in_range = [v for v in versions if rng.matches(v)]
        if not in_range:
            raise RegistryError(f"no version of {name} in {self.url} matches {rng} (available: {', '.join(versions)})")
        if fingerprint is None:
            return self.entry(name, in_range[0])
        seen = []
        for v in in_range:
            e = self.entry(name, v)
            fp = e.fingerprint()
            if e.kind == "aligned" and fp is not None and fp.same_model(fingerprint):
                return e
            seen.append(f"{v} ({'aligned to ' + (fp.name or 'another model') if fp else 'unaligned'})")
        raise RegistryError(
            f"no version of {name}@{rng} in {self.url} is aligned to this model ({fingerprint.name or 'unnamed'}); "
            f"found: {', '.join(seen)}. Align one and push it: detox align --target YOUR_MODEL --calibrator ART "
            f"--out ALIGNED --version NEW_VERSION && detox artifacts push ALIGNED"
        )

    def push(self, path: str | os.PathLike[str], require_signature: Any = None) -> Entry:
        """Validate an artifact (directory or ``.detox``) fully, then publish it; a published version is immutable."""
        path = Path(path)
        if require_signature is not None:
            from detox.artifacts.signing import verify_signature

            verify_signature(path, require_signature)
        src = unpack_cached(path) if path.is_file() else path
        load_artifact(src)  # exact files, every sha256, safetensors parse: never publish something unloadable
        manifest = read_manifest(src)
        if manifest.version in self.versions(manifest.name):
            raise ConflictError(_conflict_message(self.url, manifest.name, manifest.version))
        work = Path(tempfile.mkdtemp(prefix="push-", dir=self.staging_dir()))
        try:
            archive = pack(src, work / f"{manifest.version}{ARCHIVE_SUFFIX}")
            _, signature = read_archive_head(archive)
            entry = _summary(manifest, archive.stat().st_size, sha256_file(archive), signature)
            self.publish(archive, entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return entry

    def pull(self, ref: str, fingerprint: TargetFingerprint | None = None) -> tuple[Entry, Path, Path]:
        """Resolve ``ref``, fetch it into the content-addressed cache, validate it; return (entry, archive, directory)."""
        entry = self.resolve(ref, fingerprint)
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
    return (f"{name}@{version} already exists in {url}; published versions are immutable. "
            f"Bump the version (e.g. detox align ... --version X.Y.Z) or remove it first: detox artifacts rm {name}@{version}")


# ---------------------------------------------------------------- directory registry


class DirectoryRegistry(Registry):
    """A registry in a local or shared (NFS, SMB) directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not _NAME.match(name) or not folder.is_dir():
            return []
        found = [p.name[: -len(ARCHIVE_SUFFIX)] for p in folder.iterdir()
                 if p.name.endswith(ARCHIVE_SUFFIX) and not p.name.startswith(".")]
        return sort_versions(found)

    def _archive(self, name: str, version: str) -> Path:
        Version.parse(version)  # never build paths from unvalidated strings
        if not _NAME.match(name):
            raise RegistryError(f"invalid artifact name {name!r}")
        return self.root / name / f"{version}{ARCHIVE_SUFFIX}"

    def _index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / INDEX_NAME).read_text(encoding="utf-8"))
            return data if isinstance(data, dict) and isinstance(data.get("artifacts"), dict) else {"format": 1, "artifacts": {}}
        except (OSError, ValueError):
            return {"format": 1, "artifacts": {}}

    def entry(self, name: str, version: str) -> Entry:
        path = self._archive(name, version)
        if not path.is_file():
            raise RegistryError(f"{name}@{version} is not in {self.url}")
        manifest, signature = read_archive_head(path)
        if (manifest.name, manifest.version) != (name, version):
            raise RegistryError(f"{path} holds {manifest.name}@{manifest.version}, not {name}@{version}: the registry is "
                                "inconsistent (files were moved by hand); remove that file")
        recorded = self._index()["artifacts"].get(name, {}).get(version, {})
        return _summary(manifest, path.stat().st_size, recorded.get("sha256"), signature)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive lock for index rewrites (released by the kernel if the holder dies)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _write_index(self, update: dict[tuple[str, str], dict[str, Any] | None]) -> None:
        """Apply ``update`` ((name, version) -> entry, or None to delete) to index.json under the lock, atomically."""
        with self._lock():
            index = self._index()
            arts = index["artifacts"]
            for (name, version), value in update.items():
                if value is None:
                    arts.get(name, {}).pop(version, None)
                    if name in arts and not arts[name]:
                        del arts[name]
                else:
                    arts.setdefault(name, {})[version] = value
            # drop records whose archive is gone (e.g. removed by hand)
            for name in list(arts):
                for version in list(arts[name]):
                    if not (self.root / name / f"{version}{ARCHIVE_SUFFIX}").is_file():
                        del arts[name][version]
                if not arts[name]:
                    del arts[name]
            _atomic_write(self.root / INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode(), self._tmpdir())

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

    def publish(self, archive: Path, entry: Entry) -> None:
        final = self._archive(entry.name, entry.version)
        final.parent.mkdir(parents=True, exist_ok=True)
        _link_exclusive(archive, final, self)
        _fsync_dir(final.parent)
        self._write_index({(entry.name, entry.version): entry.to_json()})

    def local_archive(self, entry: Entry) -> Path:
        path = self._archive(entry.name, entry.version)
        if not path.is_file():
            raise RegistryError(f"{entry.ref} is not in {self.url} (removed meanwhile?)")
        return path

    def remove(self, name: str, version: str) -> None:
        final = self._archive(name, version)
        if not final.is_file():
            raise RegistryError(f"{name}@{version} is not in {self.url}; see: detox artifacts list {name} --registry {self.url}")
        doomed = self._tmpdir() / f"{name}-{version}.{os.getpid()}.removed"
        os.rename(final, doomed)  # disappears atomically; then delete at leisure
        doomed.unlink(missing_ok=True)
        try:
            final.parent.rmdir()
        except OSError:
            pass
        self._write_index({(name, version): None})


def _link_exclusive(tmp: Path, final: Path, reg: DirectoryRegistry) -> None:
    """Make ``tmp`` visible as ``final`` only if ``final`` does not exist (atomic even on NFS)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise ConflictError(_conflict_message(reg.url, final.parent.name, final.name[: -len(ARCHIVE_SUFFIX)])) from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        with reg._lock():  # filesystems without hard links: check-and-rename under the registry lock instead
            if final.exists():
                raise ConflictError(_conflict_message(reg.url, final.parent.name, final.name[: -len(ARCHIVE_SUFFIX)])) from None
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
        self._cached_index: dict[str, Any] | None = None

    def _snapshot(self, refresh: bool = False) -> tuple[str | None, dict[str, Any]]:
        """(commit sha, index) of the branch; read once per registry object unless ``refresh``."""
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        if self._cached_index is not None and not refresh:
            return self._head, self._cached_index
        try:
            head = self.api.repo_info(self.repo_id, revision=self.revision, repo_type="model").sha
        except (RepositoryNotFoundError, RevisionNotFoundError):
            head, index = None, {"format": 1, "artifacts": {}}
        else:
            try:
                local = self.api.hf_hub_download(self.repo_id, INDEX_NAME, revision=head, repo_type="model",
                                                 cache_dir=str(cache_root() / "hf"))
                index = json.loads(Path(local).read_text(encoding="utf-8"))
            except EntryNotFoundError:
                index = {"format": 1, "artifacts": {}}
            except ValueError as err:
                raise RegistryError(f"{self.url}: {INDEX_NAME} is not valid JSON ({err})") from err
        self._head, self._cached_index = head, index
        return head, index

    def names(self) -> list[str]:
        return sorted(n for n, vs in self._snapshot()[1].get("artifacts", {}).items() if vs)

    def versions(self, name: str) -> list[str]:
        return sort_versions(self._snapshot()[1].get("artifacts", {}).get(name, {}))

    def entry(self, name: str, version: str) -> Entry:
        record = self._snapshot()[1].get("artifacts", {}).get(name, {}).get(version)
        if record is None:
            raise RegistryError(f"{name}@{version} is not in {self.url}")
        try:
            fields = {k: record[k] for k in Entry.__dataclass_fields__ if k in record}
            return Entry(**{**fields, "name": name, "version": version})
        except TypeError as err:
            raise RegistryError(f"{self.url}: the {INDEX_NAME} record of {name}@{version} is malformed ({err})") from err

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
            self._cached_index = None

    def publish(self, archive: Path, entry: Entry) -> None:
        from huggingface_hub import CommitOperationAdd

        head, index = self._snapshot(refresh=True)
        if entry.version in index.get("artifacts", {}).get(entry.name, {}):
            raise ConflictError(_conflict_message(self.url, entry.name, entry.version))
        index = json.loads(json.dumps(index))
        index.setdefault("artifacts", {}).setdefault(entry.name, {})[entry.version] = entry.to_json()
        ops = [CommitOperationAdd(f"{entry.name}/{entry.version}{ARCHIVE_SUFFIX}", str(archive)),
               CommitOperationAdd(INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())]
        self._commit(ops, head, f"detox: push {entry.ref}", entry.ref)

    def local_archive(self, entry: Entry) -> Path:
        head, _ = self._snapshot()
        return Path(self.api.hf_hub_download(self.repo_id, f"{entry.name}/{entry.version}{ARCHIVE_SUFFIX}",
                                             revision=head, repo_type="model", cache_dir=str(cache_root() / "hf")))

    def remove(self, name: str, version: str) -> None:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        head, index = self._snapshot(refresh=True)
        if version not in index.get("artifacts", {}).get(name, {}):
            raise RegistryError(f"{name}@{version} is not in {self.url}")
        index = json.loads(json.dumps(index))
        del index["artifacts"][name][version]
        if not index["artifacts"][name]:
            del index["artifacts"][name]
        ops = [CommitOperationDelete(f"{name}/{version}{ARCHIVE_SUFFIX}"),
               CommitOperationAdd(INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())]
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
