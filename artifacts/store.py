"""Write and read calibrator artifacts: a directory of ``manifest.json`` + safetensors + ``tokenizer.json``.

Writes are atomic (a temporary sibling directory renamed into place), so an interrupted write never
leaves a half-written artifact visible. Reads validate the manifest, the exact file set and every sha256
*before* any tensor is deserialized; only safetensors and JSON are ever parsed, never pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from detox.artifacts.manifest import (
    ALIGNMENT_WEIGHTS,
    ANTI_WEIGHTS,
    CALIBRATOR_WEIGHTS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_FILE,
    UNLISTED_FILES,
    FileEntry,
    Manifest,
)
from detox.data import sha256_file
from detox.methods import get_method

MAX_MANIFEST_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER = 1 << 20  # header of one weights file: a JSON table of names, dtypes, shapes and offsets


class ArtifactError(ValueError):
    """An artifact is missing, malformed, tampered with, or does not belong where it is used."""


def parse_json(data: bytes | str, where: str | os.PathLike[str]) -> Any:
    """JSON from an artifact or registry file, or :class:`ArtifactError` "``where`` is <reason>" (the reason alone in
    its ``reason`` attribute): never a RecursionError (deeply nested input) or an error without a file name."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        reason = "JSON nested too deeply (not written by detox)"
    except UnicodeDecodeError as err:
        reason = f"not UTF-8 text ({err.reason} at byte {err.start})"
    except json.JSONDecodeError as err:
        reason = f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
    error = ArtifactError(f"{where} is {reason}")
    error.reason = reason  # type: ignore[attr-defined]
    raise error


def validation_summary(err: ValidationError) -> str:
    """A pydantic error as one line ("field.sub: problem; ..."), for one-line CLI messages."""
    parts = []
    for e in err.errors(include_url=False)[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "(top level)"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = len(err.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


@dataclass
class Artifact:
    """A validated artifact in memory."""

    path: Path
    manifest: Manifest
    calibrator_state: dict[str, np.ndarray]
    tokenizer: Tokenizer
    alignment: dict[str, np.ndarray] | None
    anti_state: dict[str, np.ndarray] | None = None  # contrast fusion: the anti-expert's weights


def _as_numpy(value: Any, dtype: Any) -> np.ndarray:
    """Accept torch tensors or arrays; store contiguous little-endian arrays of ``dtype`` (integer arrays, such as
    a token map, as int32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.integer):
        return np.ascontiguousarray(value.astype(np.int32))
    return np.ascontiguousarray(value.astype(np.float32).astype(dtype))


def make_shareable(path: str | os.PathLike[str]) -> None:
    """mkstemp/mkdtemp create owner-only files; artifacts must be readable by the team (honouring the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o755 if os.path.isdir(path) else 0o644) & ~umask)


def publish_directory(tmp: Path, out: Path) -> None:
    """Make the complete directory ``tmp`` visible as ``out`` by renames: ``out`` is always old-or-new, never half."""
    for p in [tmp, *tmp.iterdir()]:
        make_shareable(p)
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, backup)
        os.rename(tmp, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, out)


def save_artifact(
    out_dir: str | os.PathLike[str],
    manifest_fields: dict[str, Any],
    calibrator_state: dict[str, Any],
    tokenizer: Tokenizer,
    alignment: dict[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str | os.PathLike[str]] | None = None,
    anti_state: dict[str, Any] | None = None,
) -> Manifest:
    """Write an artifact directory atomically and return its manifest.

    ``manifest_fields`` holds every manifest field except ``files`` and ``format_version``, which are
    computed here. ``extra_files`` maps optional artifact file names (e.g. ``calibrator.onnx``) to files to
    copy in. Calibrator weights are stored as float16 to keep artifacts small; torch is not needed to read them.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: _as_numpy(v, np.float16) for k, v in calibrator_state.items()}, str(tmp / CALIBRATOR_WEIGHTS))
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        if alignment is not None:
            save_file({k: _as_numpy(v, np.float32) for k, v in alignment.items()}, str(tmp / ALIGNMENT_WEIGHTS))
        if anti_state is not None:
            save_file({k: _as_numpy(v, np.float16) for k, v in anti_state.items()}, str(tmp / ANTI_WEIGHTS))
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / fname)
        files = {p.name: FileEntry(sha256=sha256_file(p), size=p.stat().st_size) for p in sorted(tmp.iterdir())}
        try:
            manifest = Manifest(format_version=FORMAT_VERSION, files=files, **manifest_fields)
        except ValidationError as err:
            raise ArtifactError(f"invalid artifact metadata: {validation_summary(err)}") from None
        _check_file_set(set(files), manifest, out)
        (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``manifest.json`` of an artifact directory (no other file is read)."""
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"artifact not found: {root} is not a directory")
    if mpath.is_symlink() or not mpath.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME} (as a regular file); it is not a detox artifact")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    try:
        data = mpath.read_bytes()
    except OSError as err:
        raise ArtifactError(f"cannot read {mpath}: {err.strerror or err}") from None
    return parse_manifest(data, root)


def parse_manifest(data: bytes, root: str | os.PathLike[str]) -> Manifest:
    """Validate manifest bytes (format version first, so newer formats get an 'upgrade' message, not a schema error)."""
    root, mpath = Path(root), Path(root) / MANIFEST_NAME
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    raw = parse_json(data, mpath)
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if type(version) is not int:  # noqa: E721 -- bool is an int subclass: "format_version": true is refused
        raise ArtifactError(f"{mpath} has no integer format_version")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{root} uses artifact format {version}, newer than this detox supports ({FORMAT_VERSION}); upgrade detox"
        )
    if version < FORMAT_VERSION:
        raise ArtifactError(f"{root} uses old artifact format {version}; re-export it with this detox version")
    try:  # strict: no true for 1, "1" for 1 or 1.0 for 1; the JSON text itself is validated
        return Manifest.model_validate_json(data, strict=True)
    except ValidationError as err:
        raise ArtifactError(f"{mpath} is invalid: {validation_summary(err)}") from None


def _check_file_set(names: set[str], manifest: Manifest, where: Path) -> None:
    required, allowed = manifest.required_files(), manifest.allowed_files()
    if not required <= names or not names <= allowed:
        raise ArtifactError(
            f"{where}: an artifact of kind {manifest.kind!r} holds {sorted(required)} "
            f"(optionally {sorted(allowed - required)}), not {sorted(names)}"
        )


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check the exact file set and every sha256 listed in the manifest."""
    present = {p.name for p in root.iterdir() if p.name not in UNLISTED_FILES}
    for name in UNLISTED_FILES:  # e.g. signature.ed25519: optional, but never a link, directory or device
        p = root / name
        if (p.is_symlink() or p.exists()) and (p.is_symlink() or not p.is_file()):
            raise ArtifactError(f"{root}: {name} is not a regular file")
    listed = set(manifest.files)
    _check_file_set(listed, manifest, root)
    missing, extra = listed - present, present - listed
    if missing:
        raise ArtifactError(f"{root}: missing file(s) {sorted(missing)}")
    if extra:
        raise ArtifactError(f"{root}: unexpected file(s) {sorted(extra)}; artifacts contain only the files their manifest lists")
    for name, entry in manifest.files.items():
        p = root / name
        if p.is_symlink() or not p.is_file():
            raise ArtifactError(f"{root}: {name} is not a regular file")
        try:
            digest = sha256_file(p) if p.stat().st_size == entry.size else None
        except OSError as err:
            raise ArtifactError(f"cannot read {p}: {err.strerror or err}") from None
        if digest != entry.sha256:
            raise ArtifactError(f"{root}: {name} does not match its sha256 in the manifest (corrupted or tampered)")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, without reading (or allocating) any tensor data."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_SAFETENSORS_HEADER, os.fstat(f.fileno()).st_size - 8):
                raise ArtifactError(f"could not read artifact files: {path} is not a safetensors file (header length {n}); "
                                    "re-export the artifact")
            header = parse_json(f.read(n), path)
    except OSError as err:
        raise ArtifactError(f"cannot read {path}: {err.strerror or err}") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: its safetensors header is not a JSON object")
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= 1 << 40 for d in shape):  # noqa: E721
            raise ArtifactError(f"{path}: tensor {name!r} has no valid shape in the safetensors header")
        shapes[name] = tuple(shape)
    return shapes


def check_state_shapes(shapes: dict[str, tuple[int, ...]], manifest: Manifest, where: Path | str) -> None:
    """Refuse calibrator weights whose names/shapes differ from the manifest's architecture: building the model
    allocates what the manifest declares, so it must be exactly what the (size-checked) weights hold."""
    expected = manifest.calibrator.state_shapes()
    if shapes == expected:
        return
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{k} is {list(shapes[k])}, not {list(expected[k])}" for k in sorted(set(shapes) & set(expected))
             if shapes[k] != expected[k]]
    problems = ([f"missing {missing[:3]}" + ("..." if len(missing) > 3 else "")] if missing else []) + \
               ([f"unexpected {extra[:3]}" + ("..." if len(extra) > 3 else "")] if extra else []) + wrong[:3]
    c = manifest.calibrator
    raise ArtifactError(f"{where} does not match the manifest's calibrator architecture (vocab_size {c.vocab_size}, "
                        f"hidden_size {c.hidden_size}, num_layers {c.num_layers}, ffn_size {c.ffn_size}): "
                        f"{'; '.join(problems)}; the artifact is corrupted or was edited by hand")


def _check_alignment_shapes(shapes: dict[str, tuple[int, ...]], manifest: Manifest, where: Path) -> None:
    """The alignment arrays its fusion method needs, with the shapes the manifest implies (:mod:`detox.methods`)."""
    al = manifest.alignment
    if al is None:
        return
    try:
        get_method(al.fusion).check_arrays(shapes, manifest.calibrator.hidden_size, al.target)
    except ValueError as err:
        raise ArtifactError(f"{where}: {err}; re-run detox align") from None


def _check_token_map(alignment: dict[str, np.ndarray] | None, manifest: Manifest, where: Path) -> None:
    """Token ids index the calibrator's vocabulary at generation time: check them at load instead."""
    tm = (alignment or {}).get("token_map")
    if tm is None:
        return
    vocab = manifest.calibrator.vocab_size
    if not np.issubdtype(tm.dtype, np.integer) or (tm.size and (int(tm.min()) < -1 or int(tm.max()) >= vocab)):
        raise ArtifactError(f"{where}: token_map holds ids outside the calibrator's {vocab}-token vocabulary "
                            "(-1 marks unmapped tokens); re-run detox align")
    scale = alignment.get("token_scale") if alignment else None
    if scale is not None and not (np.issubdtype(scale.dtype, np.floating) and np.all((scale >= 0) & (scale <= 1))):
        raise ArtifactError(f"{where}: token_scale holds values outside [0, 1]; re-run detox align")


def load_directory(path: str | os.PathLike[str]) -> Artifact:
    """Validate and load an artifact directory; raises :class:`ArtifactError` before using anything invalid.

    Directories only, so this layer needs neither the archive reader nor the cache (which validate with it):
    :func:`detox.artifacts.cache.load_artifact` also takes a ``.detox`` archive.
    """
    root = Path(path)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    # shapes from the headers before any tensor is read: a manifest must not make loading allocate what it declares
    check_state_shapes(safetensors_shapes(root / CALIBRATOR_WEIGHTS), manifest, root / CALIBRATOR_WEIGHTS)
    if manifest.anti_expert is not None:
        check_state_shapes(safetensors_shapes(root / ANTI_WEIGHTS), manifest, root / ANTI_WEIGHTS)
    if manifest.kind == "aligned":
        _check_alignment_shapes(safetensors_shapes(root / ALIGNMENT_WEIGHTS), manifest, root / ALIGNMENT_WEIGHTS)
    try:
        state = load_file(str(root / CALIBRATOR_WEIGHTS))
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_FILE))
        alignment = load_file(str(root / ALIGNMENT_WEIGHTS)) if manifest.kind == "aligned" else None
        anti_state = load_file(str(root / ANTI_WEIGHTS)) if manifest.anti_expert is not None else None
    except Exception as err:  # safetensors/tokenizers raise their own types
        raise ArtifactError(f"{root}: could not read artifact files: {err}") from err
    if tokenizer.get_vocab_size() != manifest.calibrator.vocab_size:
        raise ArtifactError(f"{root}: tokenizer has {tokenizer.get_vocab_size()} tokens, manifest says {manifest.calibrator.vocab_size}")
    _check_token_map(alignment, manifest, root / ALIGNMENT_WEIGHTS)
    return Artifact(path=root, manifest=manifest, calibrator_state=state, tokenizer=tokenizer, alignment=alignment,
                    anti_state=anti_state)
