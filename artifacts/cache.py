"""The local content-addressed cache: archives and their validated extractions, keyed by the archive's sha256.

Keying by content (not by name/version) means a registry that re-publishes different bytes under the same
name can never be confused with what was cached before, and the same archive pulled from two registries is
stored once. Everything lands by rename from a temporary path, so concurrent pulls are safe.

Layout (root: ``$DETOX_CACHE``, else ``$XDG_CACHE_HOME/detox``, else ``~/.cache/detox``)::

    blobs/sha256/<hex>.detox     archives
    unpacked/<hex>/              the validated extraction of blobs/sha256/<hex>.detox
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from detox.artifacts.archive import extract_into
from detox.artifacts.store import Artifact, ArtifactError, load_directory
from detox.data import sha256_file
from detox.faults import fault_point


def cache_root() -> Path:
    if os.environ.get("DETOX_CACHE"):
        return Path(os.environ["DETOX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "detox"


def blob_path(sha256: str) -> Path:
    return cache_root() / "blobs" / "sha256" / f"{sha256}.detox"


def add_blob(src: str | os.PathLike[str], expected_sha256: str | None = None) -> Path:
    """Copy an archive into the cache (hashing while copying) and return its content-addressed path."""
    if expected_sha256 and blob_path(expected_sha256).is_file():
        return blob_path(expected_sha256)
    folder = cache_root() / "blobs" / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        h = hashlib.sha256()
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            for chunk in iter(lambda: fin.read(1 << 20), b""):
                h.update(chunk)
                fout.write(chunk)
        digest = h.hexdigest()
        if expected_sha256 and digest != expected_sha256:
            raise ArtifactError(f"{src}: sha256 {digest[:16]}… differs from the registry's record {expected_sha256[:16]}… "
                                "(changed or corrupted after it was published); ask the publisher to re-push it")
        fault_point("cache:blob")
        os.replace(tmp, blob_path(digest))
        return blob_path(digest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unpack_cached(archive: str | os.PathLike[str]) -> Path:
    """The validated extraction of ``archive`` in the cache (extracted, validated and renamed in on first use)."""
    archive = Path(archive)
    digest = sha256_file(archive)
    final = cache_root() / "unpacked" / digest
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        read = extract_into(archive, tmp)
        if read != digest:
            raise ArtifactError(f"{archive} changed while it was being read; try again")
        load_directory(tmp)  # full validation before anything becomes visible in the cache
        fault_point("cache:unpacked")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # someone else renamed the same content in first: theirs is as good as ours
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Validate and load an artifact directory or ``.detox`` archive; raises :class:`ArtifactError` before using anything invalid.

    An archive is extracted (strictly, see :mod:`detox.artifacts.archive`) into the content-addressed cache first.
    """
    root = Path(path)
    return load_directory(unpack_cached(root) if root.is_file() else root)
