"""Calibrator artifacts: manifest schema, atomic writes, validated loads, the shipped defaults."""

from detox.artifacts.manifest import FORMAT_VERSION, Manifest, TargetFingerprint
from detox.artifacts.cache import load_artifact
from detox.artifacts.store import Artifact, ArtifactError, read_manifest, save_artifact

__all__ = [
    "FORMAT_VERSION", "Manifest", "TargetFingerprint", "Artifact", "ArtifactError",
    "load_artifact", "read_manifest", "save_artifact",
]
