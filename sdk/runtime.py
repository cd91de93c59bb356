"""A loaded calibrator artifact, ready to run on a backend and to be fused into a target."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from detox.artifacts.manifest import CALIBRATOR_ONNX, MIN_MAPPED_SHARE, Manifest, TargetFingerprint
from detox.artifacts.cache import load_artifact
from detox.artifacts.store import Artifact, ArtifactError, check_state_shapes
from detox.fusion import INTERPOLATE, Head
from detox.methods import get_method
from detox.onnx_calibrator import OnnxRunner
from detox.stream import CalibratorStream, PairRunner


class TargetMismatchError(ArtifactError):
    """An aligned calibrator was used with a model other than the one it was aligned to."""


class TorchRunner:
    """Runs :class:`~detox.calibrator.CalibratorLM` with its KV cache, one chunk at a time."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def empty_state(self) -> Any:
        return self.model.empty_cache(1)

    def run(self, ids: list[int], state: Any) -> tuple[Any, Any]:
        import torch

        with torch.inference_mode():
            hidden, state = self.model(torch.tensor([ids], dtype=torch.long), state)
        return hidden[0, -1], state


class Calibrator:
    """An (aligned) calibrator: manifest, tokenizer, weights and alignment map, validated on load."""

    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact
        self._torch_models: dict[str, Any] = {}
        self._runner: Any = None
        self._onnx_runner: Any = None

    @classmethod
    def load(cls, path: str | os.PathLike[str], require_signature: Any = None) -> "Calibrator":
        """Load an artifact directory or ``.detox`` archive.

        ``require_signature``: a trusted public key (PEM path/text, key object, or a list of them); when given,
        unsigned or otherwise-signed artifacts are refused before any weight is read.
        """
        if require_signature is not None:
            from detox.artifacts.signing import load_verified

            return cls(load_verified(path, require_signature))
        return cls(load_artifact(path))

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def path(self) -> Path:
        return self.artifact.path

    @property
    def tokenizer(self) -> Any:
        return self.artifact.tokenizer

    @property
    def default_strength(self) -> float:
        return self.manifest.alignment.default_strength if self.manifest.alignment else 0.0

    @property
    def fusion_mode(self) -> str:
        """``interpolate`` (one calibrator, the paper's rule) or ``contrast`` (expert/anti-expert pair)."""
        return self.manifest.alignment.fusion if self.manifest.alignment else INTERPOLATE

    def check_strength(self, strength: float | None) -> float:
        """λ (``None``: the artifact's recommended one) as a float in the range of this artifact's fusion method."""
        strength = self.default_strength if strength is None else strength
        return get_method(self.fusion_mode).config.check_strength(strength)

    @property
    def has_anti_expert(self) -> bool:
        return self.artifact.anti_state is not None

    def torch_model(self, which: str = "expert") -> Any:
        """The calibrator (``which="anti"``: the anti-expert) as a float32 torch module in eval mode (built once)."""
        if which not in self._torch_models:
            import torch

            from detox.calibrator import CalibratorLM

            weights = self.artifact.calibrator_state if which == "expert" else self.artifact.anti_state
            if weights is None:
                raise ArtifactError(f"{self.path} has no anti-expert; only contrast-fusion artifacts do")
            # load_artifact checked the files' headers; this covers Artifacts built in memory, before allocating
            check_state_shapes({k: tuple(v.shape) for k, v in weights.items()}, self.manifest, f"{self.path} ({which} weights)")
            model = CalibratorLM(self.manifest.calibrator)
            state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ArtifactError(f"{self.path}: {which} weights do not fit the manifest's architecture (missing {missing}, unexpected {unexpected})")
            self._torch_models[which] = model.eval()
        return self._torch_models[which]

    def torch_runner(self) -> Any:
        """The calibrator on torch; a :class:`~detox.stream.PairRunner` for contrast artifacts."""
        if self.has_anti_expert:
            return PairRunner(TorchRunner(self.torch_model()), TorchRunner(self.torch_model("anti")))
        return TorchRunner(self.torch_model())

    def onnx_runner(self) -> Any:
        """The calibrator as an :class:`~detox.onnx_calibrator.OnnxRunner` (torch-free; built once); for contrast
        artifacts, the expert/anti-expert pair in one graph that gives their log-ratio.

        Uses the ``calibrator.onnx`` that ``detox align`` writes into aligned artifacts.
        """
        if self._onnx_runner is None:
            if CALIBRATOR_ONNX not in self.manifest.files:
                raise ArtifactError(
                    f"{self.path} has no {CALIBRATOR_ONNX}, which torch-free backends (llama.cpp) need; it was "
                    f"written without the onnx package. pip install onnx, then re-run the alignment once: "
                    f"detox align --target YOUR_MODEL --calibrator CALIBRATOR --out NEW_DIR"
                )
            runner = OnnxRunner(self.path / CALIBRATOR_ONNX)
            if runner.gives_log_ratio != self.has_anti_expert:
                raise ArtifactError(
                    f"{self.path / CALIBRATOR_ONNX} holds {'a contrast pair' if runner.gives_log_ratio else 'one model'} "
                    f"but the artifact {'has an' if self.has_anti_expert else 'has no'} anti-expert; export it again: "
                    f"detox artifacts reexport-onnx {self.path} --out NEW_DIR"
                )
            self._onnx_runner = runner
        return self._onnx_runner

    def default_runner(self) -> Any:
        """ONNX Runtime when the artifact carries ``calibrator.onnx`` and onnxruntime is installed, else torch.

        The calibrator step is tiny, so per-operator overhead dominates: ONNX Runtime runs one cached step in well
        under a millisecond where eager torch needs several.
        """
        if self._runner is None:
            if CALIBRATOR_ONNX in self.manifest.files and importlib.util.find_spec("onnxruntime") is not None:
                self._runner = self.onnx_runner()
            else:
                self._runner = self.torch_runner()
        return self._runner

    def stream(self, runner: Any = None) -> CalibratorStream:
        return CalibratorStream(runner or self.default_runner(), self.tokenizer, self.manifest.calibrator.bos_token_id)

    def require_aligned_to(self, fingerprint: TargetFingerprint) -> None:
        """Raise :class:`TargetMismatchError` unless this artifact was aligned to exactly this target."""
        if self.manifest.kind != "aligned" or self.manifest.alignment is None:
            raise ArtifactError(
                f"{self.path} is an unaligned calibrator; align it to your model first: "
                f"detox align --target MODEL --calibrator {self.path} --out ALIGNED_DIR"
            )
        bound = self.manifest.alignment.target
        diffs = bound.differences(fingerprint)
        if diffs:
            raise TargetMismatchError(
                f"calibrator {self.manifest.name}@{self.manifest.version} was aligned to "
                f"{bound.name or 'another model'} and does not match this model ({', '.join(diffs)} differ); "
                f"run: detox align --target YOUR_MODEL --calibrator {self.path} --out ALIGNED_DIR"
            )
        share = self.manifest.alignment.mapped_share
        if share is not None and share < MIN_MAPPED_SHARE:  # aligned with a lowered detox align --min-mapped-share
            warnings.warn(f"{self.path}: the calibrator reads only {share:.1%} of this target's vocabulary (below "
                          f"{MIN_MAPPED_SHARE:.0%}); fusion leaves the rest of its tokens untouched", stacklevel=3)

    def alignment_arrays(self) -> dict[str, np.ndarray]:
        if self.artifact.alignment is None:
            raise ArtifactError(f"{self.path} has no alignment; run detox align")
        return self.artifact.alignment

    def fusion_head(self, W_out: Any) -> Head:
        """Precompute the fusion head of this artifact's method (:mod:`detox.methods`) for a target output embedding
        (torch tensor or numpy array), on W_out's framework and device."""
        self.alignment_arrays()  # an unaligned calibrator has no head: say so before anything else
        config = self.manifest.alignment.fusion_config()
        try:
            return get_method(self.fusion_mode).build_head(self, W_out, config)
        except ArtifactError:
            raise
        except ValueError as err:  # the alignment does not fit this target, or the artifact misses a piece
            raise ArtifactError(f"{self.path}: {err}") from None
