"""Single-file ``.detox`` archives: the artifact's flat files in an uncompressed ustar tar, read by a strict reader.

An archive comes from strangers, so nothing here uses :mod:`tarfile` extraction. The reader parses 512-byte
ustar headers itself and accepts only: regular-file members, names from the manifest's allowed set (no
directories, ``/``, ``..``, absolute paths, links, devices, pax/GNU extension headers), ``manifest.json``
first, each size equal to what the manifest declares, a bounded number and total size of members, and a
complete end-of-archive marker (so a truncated download is refused). Members are written with exclusive
creates into a fresh temporary directory, the result is validated by the normal loader, and only then
renamed into place. Plain ``tar tf x.detox`` lists an archive.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from detox.artifacts.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from detox.artifacts.store import (
    MAX_MANIFEST_BYTES, ArtifactError, load_directory, make_shareable, parse_manifest, publish_directory, read_manifest,
    verify_files,
)

ARCHIVE_SUFFIX = ".detox"
BLOCK = 512
MAX_MEMBERS = 16
MAX_SIGNATURE_BYTES = 4096
_TRAILER_SLACK = 1 << 20  # end-of-archive zero padding accepted after the marker
_REGULAR = (b"0", b"\x00")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd: refused, never decompressed
_TYPE_NAMES = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
               b"5": "directory", b"6": "FIFO", b"7": "contiguous file", b"x": "pax header", b"g": "pax global header",
               b"L": "GNU long name", b"K": "GNU long link", b"S": "GNU sparse file"}


def max_artifact_bytes() -> int:
    """Upper bound on the files of one artifact (env ``DETOX_MAX_ARTIFACT_BYTES``, default 4 GiB): a disk-filling guard."""
    try:
        return int(os.environ.get("DETOX_MAX_ARTIFACT_BYTES", str(4 << 30)))
    except ValueError as err:
        raise ArtifactError(f"DETOX_MAX_ARTIFACT_BYTES must be an integer number of bytes: {err}") from err


# ---------------------------------------------------------------- writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = size, 0o644, 0, 0, 0, "", ""
    return info


def pack(src: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write the artifact directory ``src`` as a ``.detox`` archive (validated first, deterministic bytes, atomic)."""
    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    verify_files(src, manifest)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    names = [MANIFEST_NAME, *sorted(manifest.files)]
    if (src / SIGNATURE_NAME).is_file():
        names.append(SIGNATURE_NAME)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name in names:
                    with open(src / name, "rb") as member:
                        tar.addfile(_tarinfo(name, os.fstat(member.fileno()).st_size), member)
            f.flush()
            os.fsync(f.fileno())
        make_shareable(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------- strict reading


@dataclass
class Member:
    name: str
    size: int


class _Reader:
    """Sequential ustar reader that hashes every byte it consumes (so callers can check what they extracted)."""

    def __init__(self, f: BinaryIO, where: Path) -> None:
        self.f, self.where, self.sha = f, where, hashlib.sha256()
        self.count = 0

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        if len(data) < n:
            raise ArtifactError(f"{self.where} is truncated (ends inside a member); download or copy it again")
        return data

    def next(self) -> Member | None:
        """The next member's header, or ``None`` at a valid end-of-archive marker."""
        header = self.f.read(BLOCK)
        self.sha.update(header)
        if self.count == 0 and header.startswith(_COMPRESSED):
            raise ArtifactError(f"{self.where} is compressed; .detox archives are plain (uncompressed) tar: detox artifacts pack DIR --out X.detox")
        if len(header) < BLOCK:
            raise ArtifactError(f"{self.where} is truncated (no end-of-archive marker); download or copy it again")
        if header == bytes(BLOCK):
            self._trailer()
            return None
        self.count += 1
        if self.count > MAX_MEMBERS:
            raise ArtifactError(f"{self.where} has more than {MAX_MEMBERS} members; not a detox archive")
        stored = _octal(header[148:156], self.where, "checksum")
        unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
        signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)  # some old tars sign bytes
        if stored not in (unsigned, signed):
            raise ArtifactError(f"{self.where}: corrupt tar header (checksum mismatch); not a valid .detox archive")
        if header[257:263] not in (b"ustar\x00", b"ustar "):
            raise ArtifactError(f"{self.where} is not a ustar archive; create archives with: detox artifacts pack DIR --out X.detox")
        raw_name = header[:100].split(b"\x00", 1)[0]
        if header[257:263] == b"ustar\x00" and header[345:500].strip(b"\x00"):
            raw_name = header[345:500].split(b"\x00", 1)[0] + b"/" + raw_name
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise ArtifactError(f"{self.where}: member name {raw_name!r} is not plain ASCII; refusing the archive") from None
        kind = header[156:157]
        if kind not in _REGULAR:
            what = _TYPE_NAMES.get(kind, f"type {kind!r}")
            raise ArtifactError(f"{self.where}: member {name!r} is a {what}; detox archives hold regular files only")
        if "/" in name or "\\" in name or name.startswith("..") or name in ("", ".") or ":" in name:
            raise ArtifactError(f"{self.where}: unsafe path {name!r} in archive; only flat file names are allowed (refusing to extract)")
        return Member(name, _octal(header[124:136], self.where, "size"))

    def read_bytes(self, member: Member) -> bytes:
        data = self._read(member.size)
        self._pad(member.size)
        return data

    def copy_to(self, member: Member, dest: Path) -> None:
        # "xb": exclusive create; dest lives in a fresh private temp directory, so nothing can pre-exist there
        with open(dest, "xb") as out:
            left = member.size
            while left:
                chunk = self._read(min(left, 1 << 20))
                out.write(chunk)
                left -= len(chunk)
        self._pad(member.size)

    def _pad(self, size: int) -> None:
        if size % BLOCK:
            self._read(BLOCK - size % BLOCK)

    def _trailer(self) -> None:
        rest = self.f.read(_TRAILER_SLACK + 1)
        self.sha.update(rest)
        if len(rest) > _TRAILER_SLACK or rest.strip(b"\x00"):
            raise ArtifactError(f"{self.where} has data after its end-of-archive marker; refusing it")


def _octal(field: bytes, where: Path, what: str) -> int:
    if field[:1] and field[0] & 0x80:
        if what == "size":
            raise ArtifactError(f"{where}: tar size uses base-256 encoding (member too large for a detox artifact)")
        raise ArtifactError(f"{where}: corrupt tar header ({what} field); not a valid .detox archive")
    text = field.replace(b"\x00", b" ").strip()
    # octal digits only: int(..., 8) alone would also take "-1", "+7" or "1_0", and a negative size then read the
    # whole rest of the file as one member
    if not re.fullmatch(rb"[0-7]*", text):
        raise ArtifactError(f"{where}: corrupt tar header ({what} field {bytes(field)!r} is not an octal number); "
                            "not a valid .detox archive")
    return int(text or b"0", 8)


def _open_checked(archive: Path) -> BinaryIO:
    if archive.is_symlink() and not archive.exists():
        raise ArtifactError(f"artifact not found: {archive}")
    if not archive.is_file():
        raise ArtifactError(f"artifact not found: {archive} is not a file")
    limit = max_artifact_bytes() + MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + (MAX_MEMBERS + 1) * BLOCK * 2 + _TRAILER_SLACK
    if archive.stat().st_size > limit:
        raise ArtifactError(f"{archive} is larger than the artifact size limit ({limit} bytes; raise DETOX_MAX_ARTIFACT_BYTES if it is trusted)")
    return open(archive, "rb")


def _read_manifest_member(reader: _Reader, archive: Path) -> tuple[bytes, Manifest]:
    first = reader.next()
    if first is None or first.name != MANIFEST_NAME:
        raise ArtifactError(f"{archive}: {MANIFEST_NAME} must be the archive's first member; repack it with: detox artifacts pack DIR --out X.detox")
    if first.size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{archive}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    data = reader.read_bytes(first)
    return data, parse_manifest(data, archive)


def extract_into(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> str:
    """Strictly extract ``archive`` into the empty directory ``dest``; return the sha256 of the bytes read.

    Checks names, types and declared sizes before writing a byte; does *not* verify hashes (the loader does).
    """
    archive, dest = Path(archive), Path(dest)
    with _open_checked(archive) as f:
        reader = _Reader(f, archive)
        data, manifest = _read_manifest_member(reader, archive)
        (dest / MANIFEST_NAME).write_bytes(data)
        declared = sum(e.size for e in manifest.files.values())
        if declared > max_artifact_bytes():
            raise ArtifactError(f"{archive}: its manifest declares {declared} bytes of files, over the limit of "
                                f"{max_artifact_bytes()} (raise DETOX_MAX_ARTIFACT_BYTES if the artifact is trusted)")
        allowed = set(manifest.files) | {SIGNATURE_NAME}
        seen = {MANIFEST_NAME}
        while (member := reader.next()) is not None:
            if member.name in seen:
                raise ArtifactError(f"{archive}: member {member.name!r} appears twice; refusing the archive")
            if member.name not in allowed:
                raise ArtifactError(f"{archive}: unexpected file {member.name!r} in archive; its manifest lists only "
                                    f"{sorted(manifest.files)} (plus an optional {SIGNATURE_NAME})")
            expected = MAX_SIGNATURE_BYTES if member.name == SIGNATURE_NAME else manifest.files[member.name].size
            if member.size > expected or (member.name != SIGNATURE_NAME and member.size != expected):
                raise ArtifactError(f"{archive}: {member.name} is {member.size} bytes, but its manifest says "
                                    f"{expected} (corrupted or tampered)")
            seen.add(member.name)
            reader.copy_to(member, dest / member.name)
        return reader.sha.hexdigest()


def unpack(archive: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Extract and fully validate ``archive`` in a temporary sibling of ``out``, then rename it into place."""
    archive, out = Path(archive), Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        extract_into(archive, tmp)
        load_directory(tmp)  # the normal loader: exact file set, every sha256, safetensors/tokenizer parse
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_archive_head(archive: str | os.PathLike[str]) -> tuple[Manifest, bytes | None]:
    """The manifest and raw signature of an archive, without extracting anything (for listings)."""
    archive = Path(archive)
    with _open_checked(archive) as f:
        reader = _Reader(f, archive)
        _, manifest = _read_manifest_member(reader, archive)
        signature = None
        while (member := reader.next()) is not None:
            if member.name == SIGNATURE_NAME and member.size <= MAX_SIGNATURE_BYTES:
                signature = reader.read_bytes(member)
            else:
                f.seek(member.size + (-member.size % BLOCK), io.SEEK_CUR)  # cheap skip; no hashing needed here
        return manifest, signature
