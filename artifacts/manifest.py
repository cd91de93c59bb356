"""The artifact manifest: a pydantic schema that every artifact carries as ``manifest.json``.

The manifest says what the artifact is (format version, name, semver version, calibrator architecture),
where it came from (training-data hash, seed, metrics), which target it belongs to (fingerprint) and the
sha256 of every other file, so a loader can refuse anything that was changed after it was written.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from detox.artifacts.semver import MAX_VERSION_CHARS, is_version
from detox.config import CalibratorConfig
from detox.fusion import INTERPOLATE
from detox.methods import METHODS, MethodConfig, get_method
from detox.methods.contrast import ContrastConfig, Gate, Plausibility, TopK

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CALIBRATOR_WEIGHTS = "calibrator.safetensors"
TOKENIZER_FILE = "tokenizer.json"
ALIGNMENT_WEIGHTS = "alignment.safetensors"
CALIBRATOR_ONNX = "calibrator.onnx"  # optional: the calibrator (or contrast pair) for torch-free backends
ANTI_WEIGHTS = "anti_calibrator.safetensors"  # contrast fusion: the anti-expert (same tokenizer and architecture)
# the anti-expert's graph before layout 3 (now the pair is one calibrator.onnx): never read, still allowed so that
# artifacts 3.0.0/3.0.1 load and `detox artifacts reexport-onnx` can bring them up to date (not dead code)
ANTI_ONNX = "anti_calibrator.onnx"
SIGNATURE_NAME = "signature.ed25519"  # optional; signs manifest.json, so the manifest cannot list it
UNLISTED_FILES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})  # the only files an artifact may hold beyond manifest.files

# Names and versions become registry paths (NAME/VERSION.detox), so they are validated with re.fullmatch: a "$"
# anchor would also accept a trailing newline ("9.9.9\n"), which once made an entry nobody could list or remove.
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,127}"
_NAME = re.compile(NAME_PATTERN)


def is_artifact_name(text: object) -> bool:
    """True for a valid artifact name: the one check used by manifests, registries and ``NAME@RANGE`` references."""
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def check_name_version(name: str | None = None, version: str | None = None) -> None:
    """Raise ValueError unless ``name``/``version`` (when given) are valid artifact metadata; commands call it before
    long work so a bad --name fails at once, not when the result is saved."""
    if name is not None and not is_artifact_name(name):
        raise ValueError(f"artifact name {name!r}: use lower-case letters, digits, '.', '_' or '-' (max 128 chars)")
    if version is not None and not is_version(version):
        raise ValueError(f"version {version!r} is not semantic versioning (MAJOR.MINOR.PATCH, at most {MAX_VERSION_CHARS} characters)")


MAX_TARGET_VOCAB = 1 << 21  # target models: 2,097,152 tokens (today's largest vocabularies are ~262k)
MAX_TARGET_HIDDEN = 1 << 16  # 65,536


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TargetFingerprint(_Strict):
    """Identity of a target model: what an aligned calibrator is bound to."""

    vocab_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    vocab_size: int = Field(ge=1, le=MAX_TARGET_VOCAB)
    hidden_size: int = Field(ge=1, le=MAX_TARGET_HIDDEN)
    output_embedding_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = ""  # informative only (e.g. the path it was computed from); not compared

    def same_model(self, other: "TargetFingerprint") -> bool:
        return self.differences(other) == []

    def differences(self, other: "TargetFingerprint") -> list[str]:
        fields = ("vocab_size", "hidden_size", "vocab_sha256", "output_embedding_sha256")
        return [f for f in fields if getattr(self, f) != getattr(other, f)]


class TrainingInfo(_Strict):
    data_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    data_files: list[str] = []
    num_documents: int = Field(ge=0)
    num_tokens: int = Field(ge=0)
    steps: int = Field(ge=0)
    seed: int
    metrics: dict[str, float] = {}


MIN_MAPPED_SHARE = 0.5  # see AlignmentInfo.mapped_share and docs/align.md


_CONTRAST = ContrastConfig()  # format 1 keeps the contrast rule's settings at the top of "alignment"


# How an artifact is bound to its target and fused into it. `fusion` names a method of detox.methods, whose config
# validates (and is rebuilt from) default_strength, its own fields here and `settings`.
class AlignmentInfo(_Strict):
    method: str  # how the alignment arrays were made: "vocab+context", "vocab" (interpolate), "token-map" (contrast)
    target: TargetFingerprint
    fusion: str = Field(default=INTERPOLATE, json_schema_extra={"enum": list(METHODS)})
    default_strength: float = Field(ge=0.0, le=max(m.config.max_strength for m in METHODS.values()))
    top_k: TopK = _CONTRAST.top_k  # contrast only: candidate tokens per step ...
    plausibility: Plausibility = _CONTRAST.plausibility  # ... with p ≥ plausibility · max p
    suppress_only: bool = _CONTRAST.suppress_only  # contrast only: use min(0, log p_expert − log p_anti)
    # contrast only: token_scale applies only where the prompt's toxicity (shipped scorer) is below this; None: always
    exempt_gate: Gate | None = _CONTRAST.exempt_gate
    seed: int
    # share of the target's vocabulary whose text the calibrator reads (detox.token_map.check_mapped_share); None:
    # aligned before detox recorded it. detox align refuses below MIN_MAPPED_SHARE unless told otherwise; wrap warns.
    mapped_share: float | None = Field(default=None, ge=0.0, le=1.0)
    metrics: dict[str, float] = {}
    settings: dict[str, float | int | str | bool] = {}

    @model_validator(mode="after")
    def _check_method(self) -> "AlignmentInfo":
        self.fusion_config()  # an unknown method, or a setting (e.g. default_strength) out of its range
        return self

    def fusion_config(self) -> MethodConfig:
        """The fusion method's config this artifact was aligned with."""
        return get_method(self.fusion).config.from_alignment(self)


class Manifest(_Strict):
    format_version: int
    kind: Literal["calibrator", "aligned"]
    name: str
    version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    detox_version: str
    description: str = ""
    calibrator: CalibratorConfig
    training: TrainingInfo
    alignment: AlignmentInfo | None = None
    anti_expert: TrainingInfo | None = None  # contrast fusion: how the anti-expert (ANTI_WEIGHTS) was trained
    evaluation: dict[str, float] = {}
    files: dict[str, FileEntry]

    @model_validator(mode="after")
    def _check_pair(self) -> "Manifest":
        fusion = self.alignment.fusion if self.alignment is not None else None
        pair = fusion is not None and get_method(fusion).uses_anti_expert
        if pair != (self.anti_expert is not None):
            with_anti = ", ".join(m.name for m in METHODS.values() if m.uses_anti_expert)
            raise ValueError(f"{fusion} fusion needs an anti_expert" if pair else
                             f"only {with_anti} fusion has an anti_expert, not {fusion or 'an unaligned calibrator'}")
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        check_name_version(name=v)
        return v

    @field_validator("version")
    @classmethod
    def _check_version(cls, v: str) -> str:
        check_name_version(version=v)
        return v

    def required_files(self) -> set[str]:
        names = {CALIBRATOR_WEIGHTS, TOKENIZER_FILE}
        if self.kind == "aligned":
            names.add(ALIGNMENT_WEIGHTS)
        if self.anti_expert is not None:
            names.add(ANTI_WEIGHTS)
        return names

    def allowed_files(self) -> set[str]:
        return self.required_files() | {CALIBRATOR_ONNX} | ({ANTI_ONNX} if self.anti_expert is not None else set())
