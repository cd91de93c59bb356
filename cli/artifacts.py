"""``detox artifacts ...``: package, sign, verify, publish and fetch calibrator artifacts.

Every command validates before it writes, writes to a temporary path and renames, and turns any refusal
into one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from detox.artifact_onnx import reexport_onnx
from detox.artifacts.archive import ARCHIVE_SUFFIX, pack, read_archive_head, unpack
from detox.artifacts.cache import load_artifact
from detox.artifacts.manifest import is_artifact_name
from detox.artifacts.registry import DirectoryRegistry, RegistryError, looks_like_ref, open_registry, shell_quote
from detox.artifacts.semver import is_version
from detox.artifacts.store import read_manifest
from detox.cli.errors import user_errors
from detox.cli.options import onnx_weights_option
from detox.data import write_bytes_atomic
from detox.fingerprint import fingerprint_target
from detox.runtime import Calibrator

_REGISTRY = click.option(
    "--registry", envvar="DETOX_REGISTRY", default=None, metavar="REG",
    help="Directory, file:///PATH or hf://ORG/REPO. Default: $DETOX_REGISTRY, else ~/.cache/detox/registry.",
)


def _open(registry: str | None) -> Any:
    """The registry, with entries it must skip (unreadable) reported as one ``warning:`` line each on stderr."""
    reg = open_registry(registry)
    reg.warn = lambda message: click.echo(f"warning: {message}", err=True)
    return reg


def _short(key_id: str | None) -> str:
    return key_id[:16] if key_id else "-"


@click.group("artifacts")
def artifacts_group() -> None:
    """Package, sign, verify, publish and fetch calibrator artifacts (see docs/artifacts.md)."""


@artifacts_group.command("keygen")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Private key file to create; the public key goes to OUT.pub.")
@user_errors
def keygen_cmd(out: str) -> None:
    """Create an Ed25519 signing key pair (private PEM, mode 0600, and OUT.pub). Never overwrites."""
    from detox.artifacts.signing import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(out)
    click.echo(f"wrote private key {priv} (keep it secret) and public key {pub} (share it); "
               f"key id {_short(key_id(load_public_key(pub)))}")


@artifacts_group.command("sign")
@click.argument("art", type=click.Path(exists=True))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False), help="Private key from detox artifacts keygen.")
@user_errors
def sign_cmd(art: str, key: str) -> None:
    """Sign artifact ART (directory or .detox) in place: writes signature.ed25519 over its manifest."""
    from detox.artifacts.signing import sign_artifact

    kid = sign_artifact(art, key)
    click.echo(f"signed {art} with key {_short(kid)}")


@artifacts_group.command("verify")
@click.argument("art")
@click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Trusted public key (PEM). Repeatable. Without it only integrity is checked, not who made ART.")
@click.option("--target", default=None, help="Also require ART to be aligned to this model (HF dir, .gguf, smollm2).")
@_REGISTRY
@user_errors
def verify_cmd(art: str, keys: tuple[str, ...], target: str | None, registry: str | None) -> None:
    """Check ART (path, .detox or NAME@RANGE): format, every file's sha256, signature (--key), target (--target)."""
    from detox.artifacts.signing import load_verified, read_signature

    if os.path.exists(art):  # a path as is; otherwise NAME@RANGE pulled (validated) from the registry
        path, label = Path(art), art
    elif looks_like_ref(art):
        reg = _open(registry)
        _, _, path = reg.pull(art)
        label = reg.url
    else:
        raise click.ClickException(f"{art} is neither an artifact path nor NAME@VERSION_RANGE")
    artifact = load_verified(path, list(keys)) if keys else load_artifact(path)
    m = artifact.manifest
    if target is not None:
        Calibrator(artifact).require_aligned_to(fingerprint_target(target))
    lines = [f"OK {m.name}@{m.version} ({m.kind}) from {label}: format {m.format_version}, {len(m.files)} files match their sha256"]
    if keys:
        lines.append("signature: valid, by a trusted key")
    else:
        sig = read_signature(artifact.path)
        lines.append("signature: NOT CHECKED (pass --key PUB)" + (f"; signed by key {_short(sig.key_id)}" if sig else "; unsigned"))
    if target is not None:
        lines.append(f"target: aligned to {target}")
    click.echo("\n".join(lines))


@artifacts_group.command("pack")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Archive to write (NAME-VERSION.detox by convention).")
@click.option("--overwrite", is_flag=True)
@user_errors
def pack_cmd(src: str, out: str, overwrite: bool) -> None:
    """Write artifact directory SRC as one .detox file (validated first)."""
    pack(src, out, overwrite=overwrite)
    click.echo(f"wrote {out}")


@artifacts_group.command("reexport-onnx")
@click.argument("src", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the re-exported artifact.")
@click.option("--version", default=None, help="Version of the copy (default: the next patch version of SRC).")
@onnx_weights_option
@click.option("--overwrite", is_flag=True)
@user_errors
def reexport_onnx_cmd(src: str, out: str, version: str | None, onnx_weights: str, overwrite: bool) -> None:
    """Copy aligned artifact SRC with its ONNX calibrators exported again by this detox (same weights).

    For artifacts exported by an older detox, whose calibrator.onnx this one refuses, or to change
    --onnx-weights; needs no target model. The copy is unsigned: sign it again with `detox artifacts sign`.
    """
    m = reexport_onnx(src, out, version=version, overwrite=overwrite, onnx_weights=onnx_weights)
    click.echo(f"wrote {out} ({m.name}@{m.version})")


@artifacts_group.command("unpack")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to create.")
@click.option("--overwrite", is_flag=True)
@user_errors
def unpack_cmd(archive: str, out: str, overwrite: bool) -> None:
    """Extract ARCHIVE strictly into a new directory (validated before it appears)."""
    unpack(archive, out, overwrite=overwrite)
    click.echo(f"wrote {out}")


@artifacts_group.command("schema")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write here instead of stdout.")
def schema_cmd(out: str | None) -> None:
    """Print the JSON Schema of manifest.json."""
    from detox.artifacts.schema import main

    main([out] if out else [])


@artifacts_group.command("list")
@click.argument("name", required=False)
@_REGISTRY
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@user_errors
def list_cmd(name: str | None, registry: str | None, as_json: bool) -> None:
    """List artifacts (or the versions of NAME) in a registry, newest first.

    An entry that cannot be read is skipped with one warning line on stderr (with the command that removes it).
    """
    reg = _open(registry)
    entries = reg.entries(name)
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    if not entries:
        click.echo(f"no artifacts{' named ' + name if name else ''} in {reg.url}")
        return
    for e in entries:
        target = (e.target or {}).get("name") or ("-" if e.target is None else "unnamed")
        signed = f"signed:{_short(e.signed_by)}" if e.signed_by else "unsigned"
        click.echo(f"{e.ref:32} {e.kind:10} target={target}  {e.size} bytes  {signed}")


@artifacts_group.command("show")
@click.argument("art")
@_REGISTRY
@user_errors
def show_cmd(art: str, registry: str | None) -> None:
    """Print the manifest of ART (directory, .detox, or NAME@RANGE in the registry) as JSON, without loading weights."""
    extra: dict[str, Any] = {}
    if os.path.isdir(art):
        manifest = read_manifest(art)
    elif os.path.isfile(art):
        manifest, _ = read_archive_head(art)
    elif looks_like_ref(art):
        reg = _open(registry)
        entry = reg.resolve(art)
        manifest, _ = read_archive_head(reg.local_archive(entry))
        extra = {"registry": reg.url, "sha256": entry.sha256, "size": entry.size, "signed_by": entry.signed_by}
    else:
        raise click.ClickException(f"{art} is neither an artifact path nor NAME@VERSION_RANGE")
    doc = json.loads(manifest.model_dump_json())
    click.echo(json.dumps({**extra, "manifest": doc} if extra else doc, indent=2))


@artifacts_group.command("push")
@click.argument("art", type=click.Path(exists=True))
@_REGISTRY
@click.option("--require-signature", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Refuse to push unless ART is signed by this public key. Repeatable.")
@user_errors
def push_cmd(art: str, registry: str | None, keys: tuple[str, ...]) -> None:
    """Publish ART (directory or .detox) as NAME@VERSION from its manifest; versions are immutable.

    Re-running a push (e.g. after it was interrupted) is safe: identical bytes already published are not an error.
    """
    reg = _open(registry)
    entry, published = reg.push(art, require_signature=list(keys) or None)
    if published:
        click.echo(f"pushed {entry.ref} to {reg.url} (sha256 {entry.sha256})")
    else:
        click.echo(f"{entry.ref} is already in {reg.url} with identical contents (sha256 {entry.sha256}); nothing to do")


@artifacts_group.command("pull")
@click.argument("ref")
@_REGISTRY
@click.option("--out", default=None, type=click.Path(), help="Also write it here: a .detox file, or else a directory.")
@click.option("--overwrite", is_flag=True)
@click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Refuse unless signed by this public key. Repeatable.")
@click.option("--target", default=None, help="Pick the newest version in range aligned to this model.")
@user_errors
def pull_cmd(ref: str, registry: str | None, out: str | None, overwrite: bool, keys: tuple[str, ...], target: str | None) -> None:
    """Fetch REF (NAME, NAME@1.2.3, NAME@^1.2, NAME@~1.2, NAME@>=1.2) into the local cache; print its path."""
    from detox.artifacts.signing import verify_signature

    reg = _open(registry)
    entry, blob, directory = reg.pull(ref, fingerprint_target(target) if target else None)
    if keys:
        verify_signature(directory, list(keys))
    dest = directory
    if out:
        dest = Path(out)
        if dest.exists() and not overwrite:
            raise click.ClickException(f"{dest} already exists; choose another --out or pass --overwrite")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if out.endswith(ARCHIVE_SUFFIX):
            write_bytes_atomic(dest, Path(blob).read_bytes())
        else:
            unpack(blob, dest, overwrite=overwrite)  # strict extraction + validation in a temp dir, then rename
    click.echo(f"pulled {entry.ref} from {reg.url} (sha256 {entry.sha256 or 'unrecorded'})"
               + (", signature valid" if keys else ""))
    click.echo(str(dest))


@artifacts_group.command("rm")
@click.argument("ref")
@_REGISTRY
@user_errors
def rm_cmd(ref: str, registry: str | None) -> None:
    """Remove exactly NAME@X.Y.Z from a registry (ranges are refused: removal is never a guess).

    An entry that list/pull skip as unreadable is removed with the exact reference they print.
    """
    reg = _open(registry)
    name, _, version = ref.partition("@")
    if not (is_artifact_name(name) and is_version(version)):
        listed = reg.find_listed(ref) if isinstance(reg, DirectoryRegistry) else None
        if listed is None:
            raise RegistryError(f"rm needs an exact NAME@X.Y.Z (or an unreadable entry exactly as list printed it), not {ref!r}")
        name, version = listed
    reg.remove(name, version)
    click.echo(f"removed {shell_quote(ref)} from {reg.url}")


@artifacts_group.command("repair")
@_REGISTRY
@user_errors
def repair_cmd(registry: str | None) -> None:
    """Rebuild a directory registry's index.json from its archives (after a crash, a hand edit or an old detox).

    Records missing ones from the archives present (sha256 of the bytes there now), drops records without an
    archive or that cannot be read, and reports archives that no longer match their record or cannot be read,
    each with the command that removes it. Never deletes an archive.
    """
    reg = _open(registry)
    if not isinstance(reg, DirectoryRegistry):
        raise RegistryError(f"repair works on directory registries; {reg.url} commits archive and index together")
    lines = reg.repair()
    for line in lines:
        click.echo(line)
    click.echo(f"{reg.url}: index.json describes {sum(len(reg.versions(n)) for n in reg.names())} archive(s)"
               + ("" if lines else "; nothing to repair"))
