"""The calibrators that ship inside the package, found by the fingerprint of the model they fit."""

from __future__ import annotations

from pathlib import Path

from detox.artifacts.manifest import TargetFingerprint
from detox.artifacts.store import ArtifactError, read_manifest

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_artifacts() -> list[Path]:
    """Directories of shipped calibrator artifacts (those with a manifest.json)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p for p in SHIPPED_DIR.iterdir() if (p / "manifest.json").is_file())


def find_shipped_for(fingerprint: TargetFingerprint) -> Path | None:
    """The shipped aligned calibrator whose target fingerprint equals ``fingerprint``, if any."""
    for path in shipped_artifacts():
        try:
            manifest = read_manifest(path)
        except ArtifactError:
            continue
        if manifest.kind == "aligned" and manifest.alignment and manifest.alignment.target.same_model(fingerprint):
            return path
    return None


def no_shipped_match_message(fingerprint: TargetFingerprint) -> str:
    names = ", ".join(p.name for p in shipped_artifacts()) or "none"
    return (
        f"no shipped calibrator is aligned to this model ({fingerprint.name or 'unnamed'}; shipped: {names}). "
        "Align the default calibrator to it once: detox align --target YOUR_MODEL --out my-aligned, "
        "then pass calibrator='my-aligned'"
    )


DEFAULT_NAME = "smollm2-135m-instruct"


def default_calibrator_path() -> Path:
    """The shipped calibrator used when ``detox align`` is given no ``--calibrator`` (it is re-aligned, so any shipped one serves)."""
    path = SHIPPED_DIR / DEFAULT_NAME
    if not (path / "manifest.json").is_file():
        raise ArtifactError(f"the shipped calibrator {path} is missing; reinstall detox or pass --calibrator")
    return path
