"""Ed25519 signatures over an artifact's ``manifest.json``.

The manifest already records the sha256 and size of every other file, so signing its exact bytes signs the
whole artifact: a changed weight breaks its hash, a changed manifest breaks the signature. The signature
lives in ``signature.ed25519`` (JSON), the one file besides the manifest that the manifest cannot list.
Signed bytes are prefixed with a context string so a detox signature cannot be replayed as anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Literal, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from detox.artifacts.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from detox.artifacts.store import (
    MAX_MANIFEST_BYTES, Artifact, ArtifactError, load_directory, parse_json, parse_manifest, validation_summary, verify_files,
)

CONTEXT = b"detox-artifact-signature-v1\n"
MAX_SIGNATURE_BYTES = 4096

PublicKeyLike = Union[str, os.PathLike, bytes, Ed25519PublicKey]
TrustedKeys = Union[PublicKeyLike, Iterable[PublicKeyLike]]


class SignatureError(ArtifactError):
    """An artifact is unsigned, signed by an untrusted key, or its signature does not match its manifest."""


class SignatureFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of the raw public key
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # informative: lets errors say "manifest changed"
    signature: str = Field(max_length=128)  # base64 of the 64-byte signature


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------- keys


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` atomically, never replacing an existing file (keys must not be clobbered)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ArtifactError(f"{path} already exists; refusing to overwrite a key (choose another --out)") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def generate_keypair(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new private key to ``out`` (PEM, mode 0600) and its public key to ``out.pub``."""
    priv_path, pub_path = Path(out), Path(str(out) + ".pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise ArtifactError(f"{p} already exists; refusing to overwrite a key (choose another --out)")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(pub_path, pub, 0o644)
    try:
        _write_new(priv_path, priv, 0o600)
    except BaseException:
        pub_path.unlink(missing_ok=True)
        raise
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (encrypted PEMs use the password in ``DETOX_SIGNING_KEY_PASSWORD``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read signing key {path}: {err.strerror or err}") from err
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise ArtifactError(f"{path} is a public key; signing needs the private key (the file without .pub)")
    password = os.environ.get("DETOX_SIGNING_KEY_PASSWORD")
    try:
        key = serialization.load_pem_private_key(data, password=password.encode() if password else None)
    except TypeError as err:
        raise ArtifactError(f"{path} is encrypted; set DETOX_SIGNING_KEY_PASSWORD ({err})") from err
    except ValueError as err:
        raise ArtifactError(f"{path} is not a readable PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactError(f"{path} is a {type(key).__name__}; detox signs with Ed25519 keys (detox artifacts keygen)")
    return key


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM text/bytes, or the path of a PEM file."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, bytes) or (isinstance(key, str) and key.lstrip().startswith("-----BEGIN")):
        data, where = (key if isinstance(key, bytes) else key.encode()), "the given key"
    else:
        try:
            data, where = Path(key).read_bytes(), str(key)
        except OSError as err:
            raise ArtifactError(f"cannot read public key {key}: {err.strerror or err}") from err
    if b"PRIVATE KEY" in data:
        raise ArtifactError(f"{where} is a private key; verification needs only the public key (KEY.pub). "
                            "Do not distribute private keys.")
    try:
        loaded = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise ArtifactError(f"{where} is not a PEM public key: {err}") from err
    if not isinstance(loaded, Ed25519PublicKey):
        raise ArtifactError(f"{where} is a {type(loaded).__name__}; detox verifies Ed25519 keys (detox artifacts keygen)")
    return loaded


def _trusted(keys: TrustedKeys) -> dict[str, Ed25519PublicKey]:
    items = [keys] if isinstance(keys, (str, bytes, os.PathLike, Ed25519PublicKey)) else list(keys)
    if not items:
        raise ArtifactError("no trusted public key given")
    loaded = [load_public_key(k) for k in items]
    return {key_id(k): k for k in loaded}


# ---------------------------------------------------------------- signing and verifying


def _manifest_bytes(root: Path) -> bytes:
    p = root / MANIFEST_NAME
    if p.is_symlink() or not p.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME}; it is not a detox artifact")
    if p.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{p} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    return p.read_bytes()


def signature_for(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    sig = key.sign(CONTEXT + manifest_bytes)
    doc = SignatureFile(key_id=key_id(key.public_key()), manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                        signature=base64.b64encode(sig).decode())
    return (doc.model_dump_json(indent=2) + "\n").encode()


def _sign_dir(root: Path, key: Ed25519PrivateKey) -> None:
    data = _manifest_bytes(root)
    verify_files(root, parse_manifest(data, root))  # never vouch for a broken or tampered artifact
    fd, tmp = tempfile.mkstemp(prefix=f".{root.name}.sig-", dir=root.parent)  # outside the artifact: never seen as an extra file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(signature_for(data, key))
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / SIGNATURE_NAME)
    finally:
        Path(tmp).unlink(missing_ok=True)


def sign_artifact(path: str | os.PathLike[str], private_key: str | os.PathLike[str] | Ed25519PrivateKey) -> str:
    """Sign an artifact directory or ``.detox`` archive in place (replacing any earlier signature); return the key id."""
    from detox.artifacts.archive import extract_into, pack

    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    path = Path(path)
    if path.is_dir():
        _sign_dir(path, key)
    elif path.is_file():
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.sign-", dir=path.parent))
        try:
            inner = work / "artifact"
            inner.mkdir()
            extract_into(path, inner)
            _sign_dir(inner, key)
            pack(inner, path, overwrite=True)  # temp + rename next to the archive
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        raise ArtifactError(f"artifact not found: {path}")
    return key_id(key.public_key())


def read_signature(root: Path) -> SignatureFile | None:
    p = root / SIGNATURE_NAME
    if not p.exists() and not p.is_symlink():
        return None
    if p.is_symlink() or not p.is_file() or p.stat().st_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{root}: {SIGNATURE_NAME} is not a regular file of at most {MAX_SIGNATURE_BYTES} bytes")
    try:
        raw = parse_json(p.read_bytes(), p)
    except ArtifactError as err:
        raise SignatureError(f"{p} is malformed ({getattr(err, 'reason', err)}); re-sign the artifact") from None
    try:
        return SignatureFile.model_validate(raw, strict=True)
    except ValidationError as err:
        raise SignatureError(f"{p} is malformed ({validation_summary(err)}); re-sign the artifact") from None


def verify_signature(path: str | os.PathLike[str], keys: TrustedKeys) -> Manifest:
    """Check that a trusted key signed this exact manifest, and that every file matches it; return the manifest.

    ``path`` is an artifact directory or a ``.detox`` archive (extracted into the cache first).
    """
    root = Path(path)
    if root.is_file():
        from detox.artifacts.cache import unpack_cached

        root = unpack_cached(root)
    trusted = _trusted(keys)
    data = _manifest_bytes(root)
    sig = read_signature(root)
    if sig is None:
        raise SignatureError(f"{path} is not signed ({SIGNATURE_NAME} missing) and a signature is required; "
                             "ask its publisher for a signed copy (detox artifacts sign ART --key KEY)")
    if sig.key_id not in trusted:
        raise SignatureError(f"{path} is signed by key {sig.key_id[:16]}, not by a trusted key "
                             f"({', '.join(k[:16] for k in trusted)}); get it from its publisher or check which public key you pass")
    if sig.manifest_sha256 != hashlib.sha256(data).hexdigest():
        raise SignatureError(f"{path}: {MANIFEST_NAME} was changed after it was signed (tampered); do not use it")
    try:
        trusted[sig.key_id].verify(base64.b64decode(sig.signature, validate=True), CONTEXT + data)
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(f"{path}: the signature does not verify with key {sig.key_id[:16]} (forged or corrupted); do not use it") from None
    manifest = parse_manifest(data, root)
    verify_files(root, manifest)
    return manifest


def load_verified(path: str | os.PathLike[str], keys: TrustedKeys) -> Artifact:
    """:func:`~detox.artifacts.cache.load_artifact`, but only for artifacts signed by one of ``keys`` (checked before
    any tensor is read)."""
    root = Path(path)
    if root.is_file():
        from detox.artifacts.cache import unpack_cached

        root = unpack_cached(root)
    signed = verify_signature(root, keys)
    artifact = load_directory(root)
    if artifact.manifest != signed:
        raise SignatureError(f"{path} changed while it was being loaded; try again")
    return artifact
