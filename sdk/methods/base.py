"""What every fusion method module provides (see :mod:`detox.methods`): a config, a head builder, an aligner and the
``detox align`` options it reads. Torch-free and free of the artifact store, so the manifest can validate with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

if TYPE_CHECKING:
    from detox.artifacts.manifest import AlignmentInfo, TargetFingerprint
    from detox.runtime import Calibrator
    from detox.targets import TargetFiles

Array = Any  # torch.Tensor or numpy.ndarray


class MethodConfig(BaseModel):
    """A fusion method's settings, with every default written once: the aligner reads them, ``detox align`` takes
    its options' defaults and types from them, and the manifest's ``alignment`` records (and is validated by) them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]  # the method's registry key, written as the manifest's alignment.fusion
    max_strength: ClassVar[float]  # λ above this is refused wherever a strength is accepted
    default_strength: float  # subclasses give the default

    @classmethod
    def check_strength(cls, strength: float) -> float:
        """λ as a float in ``[0, max_strength]``; every place that accepts a strength validates it here."""
        value = float(strength)
        if not 0.0 <= value <= cls.max_strength:
            raise ValueError(f"fusion strength for {cls.name} fusion must be in [0, {cls.max_strength:g}], got {strength}")
        return value

    @field_validator("default_strength")
    @classmethod
    def _strength_in_range(cls, v: float) -> float:
        return cls.check_strength(v)

    def alignment_fields(self) -> dict[str, Any]:
        """The manifest ``alignment`` fields this config sets (besides ``settings``, which the aligner fills)."""
        return {"default_strength": self.default_strength}

    @classmethod
    def from_alignment(cls, al: "AlignmentInfo") -> "MethodConfig":
        """The config an aligned artifact was made with: ``default_strength`` and this config's fields found in
        ``alignment.settings``; a method whose rule has other parameters reads them here."""
        return cls.parse({**{k: v for k, v in al.settings.items() if k in cls.model_fields},
                          "default_strength": al.default_strength})

    @classmethod
    def parse(cls, values: dict[str, Any]) -> "MethodConfig":
        """``cls(**values)``, a bad value raised as a one-line ValueError naming the field (not a pydantic dump)."""
        try:
            return cls(**values)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            why = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
            raise ValueError(f"{cls.name} fusion setting {where}: {why}") from None


@dataclass(frozen=True)
class CliOption:
    """A ``detox align`` option only this method reads. ``name`` is the config field it sets (its default and type
    come from the field, so they live once), or, with ``files``, the aligner input ``data`` (repeatable files)."""

    flags: str  # "--top-k", or "--suppress-only/--two-sided" for a boolean
    name: str
    help: str
    files: bool = False


@dataclass(frozen=True)
class Alignment:
    """What a method's aligner gives :func:`detox.alignment.align_artifact` to write."""

    arrays: dict[str, np.ndarray]  # alignment.safetensors
    metrics: dict[str, float]
    method: str  # the manifest's alignment.method: how the arrays were made
    settings: dict[str, float | int | str | bool]  # the manifest's alignment.settings (training provenance)


@dataclass
class AlignInputs:
    """Everything :func:`detox.alignment.align_artifact` has read before the method-specific part runs."""

    calibrator: "Calibrator"
    target: "TargetFiles"
    vocabulary: tuple[list[str | None], set[str]]  # the target's token strings and special tokens
    token_map: np.ndarray  # each target token's calibrator token (-1: none), see detox.token_map.build_token_map
    token_map_metrics: dict[str, float]  # how much of the target's vocabulary it maps (exact / first piece / not)
    W_out: np.ndarray | None  # the target's output matrix, read only for methods with needs_output_matrix
    data: list[str] | None  # alignment text files (--data)
    seed: int
    progress: bool
    log: Callable[[str], None]
    exempt_terms: Any = None  # contrast: an IdentityTerms whose terms' first tokens the rule leaves alone, or None
    exempt_penalty: float = 0.0  # contrast: the share of the suppression those tokens keep (0: none)


@dataclass(frozen=True)
class FusionMethod:
    """One registered fusion method: everything detox needs to align, record, load and run it."""

    config: type[MethodConfig]
    build_head: Callable[["Calibrator", Array, MethodConfig], Any]  # (artifact, target W_out, config) → a Head
    check_arrays: Callable[[dict[str, tuple[int, ...]], int, "TargetFingerprint"], None]  # see require_shapes
    align: Callable[[AlignInputs, MethodConfig], Alignment]
    cli_options: tuple[CliOption, ...]
    chosen_by: str  # when `detox align` uses this method, for messages
    needs_output_matrix: bool  # does its aligner read the target's output matrix (else only its fingerprint)?
    uses_anti_expert: bool  # does the artifact hold an anti-expert (manifest anti_expert, anti_calibrator.safetensors)?

    @property
    def name(self) -> str:
        return self.config.name


def require_shapes(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...] | None], fusion: str) -> None:
    """Raise ValueError unless the alignment arrays' ``shapes`` (read from the file's header, before any data) hold
    each ``expected`` name with its shape (``None``: any); a method's ``check_arrays`` calls it at load."""
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"has no {name!r} tensor, which {fusion} fusion needs")
        if shape is not None and shapes[name] != shape:
            raise ValueError(f"{name} is {list(shapes[name])}, but the manifest's calibrator and target need {list(shape)}")


def as_arrays(W_out: Array) -> tuple[Array, Callable[[Any], Array], Callable[[Any], Array]]:
    """``W_out`` as float32 in its own framework (torch or numpy) and two converters into the same framework and
    device: float32 arrays and int64 indices, so a head is built where the target's logits will be."""
    if hasattr(W_out, "detach"):
        import torch

        W = W_out.detach().float()
        return (W, lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32)).to(W.device),
                lambda x: torch.from_numpy(np.asarray(x, dtype=np.int64)).to(W.device))
    return (np.asarray(W_out, dtype=np.float32), lambda x: np.asarray(x, dtype=np.float32),
            lambda x: np.asarray(x, dtype=np.int64))
