"""``interpolate``: the paper's rule (arXiv 2506.01266) with a learned map from calibrator space into the target's.

``fused = (1 − λ)·logits_target + λ·W_out·LayerNorm(h_cal·A)``: one calibrator; ``A`` and the LayerNorm are learned
by ``detox align`` against the target's output matrix (the torch half, :mod:`detox.align_interpolate`). The math and
its derivation are in :mod:`detox.fusion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from detox.fusion import INTERPOLATE, fuse_logits
from detox.methods.base import (
    AlignInputs, Alignment, Array, CliOption, FusionMethod, MethodConfig, as_arrays, require_shapes,
)

if TYPE_CHECKING:
    from detox.artifacts.manifest import TargetFingerprint
    from detox.runtime import Calibrator


class InterpolateConfig(MethodConfig):
    name: ClassVar[str] = INTERPOLATE
    max_strength: ClassVar[float] = 1.0  # (1 − λ)·target + λ·calibrator: beyond 1 the target's sign flips

    default_strength: float = 0.3
    method: Literal["vocab+context", "vocab"] = "vocab+context"  # "vocab": the paper's InfoNCE only
    vocab_epochs: int = Field(8, ge=0)
    vocab_batch_size: int = Field(32, ge=1)
    vocab_negatives: int = Field(10, ge=1)
    vocab_lr: float = Field(1e-3, gt=0.0)
    context_epochs: int = Field(3, ge=0)
    context_batch_size: int = Field(256, ge=1)
    context_lr: float = Field(2e-3, gt=0.0)
    max_context_docs: int = Field(4000, ge=1)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    ln_eps: float = Field(1e-5, gt=0.0)


def _mean_last(x: Array) -> Array:
    return x.mean(-1)[..., None]


@dataclass
class FusionHead:
    """Precomputed per-target pieces of ``W_out · LayerNorm(h_cal · A)``."""

    A: Array  # [d_cal, d_target]
    P: Array  # [vocab, d_cal]
    g: Array  # [vocab]
    b: Array  # [vocab]
    eps: float
    mode = INTERPOLATE

    @classmethod
    def build(cls, W_out: Array, A: Array, ln_weight: Array, ln_bias: Array, eps: float = 1e-5) -> "FusionHead":
        """Precompute ``P``, ``g``, ``b`` from the target's output embedding ``W_out`` ([vocab, d_target])."""
        if W_out.shape[1] != A.shape[1]:
            raise ValueError(f"alignment maps into width {A.shape[1]} but the target's hidden size is {W_out.shape[1]}")
        P = (W_out * ln_weight[None, :]) @ A.T
        return cls(A=A, P=P, g=W_out @ ln_weight, b=W_out @ ln_bias, eps=eps)

    @property
    def device(self) -> Any:
        return getattr(self.P, "device", None)

    def prepare(self, hidden: Array) -> Array:
        """What a backend may compute before the target's logits are known (overlapped with the target's step)."""
        return self.term(hidden)

    def apply(self, logits: Array, prepared: Array, strength: float) -> Array:
        """The fused logits from :meth:`prepare`'s output; never mutates ``logits``."""
        return fuse_logits(logits, prepared, InterpolateConfig.check_strength(strength))

    @property
    def vocab_size(self) -> int:
        return int(self.P.shape[0])

    def term(self, h_cal: Array) -> Array:
        """``W_out · LayerNorm(h_cal · A)`` for ``h_cal`` of shape ``[..., d_cal]``; returns ``[..., vocab]``."""
        x = h_cal @ self.A
        mu = _mean_last(x)
        var = _mean_last((x - mu) ** 2)
        inv_std = (var + self.eps) ** -0.5
        return (h_cal @ self.P.T - mu * self.g) * inv_std + self.b


def build_head(calibrator: "Calibrator", W_out: Array, config: InterpolateConfig) -> FusionHead:
    """The head for a target output embedding ``W_out`` (torch or numpy), on its framework and device."""
    a = calibrator.alignment_arrays()
    W, to, _ = as_arrays(W_out)
    return FusionHead.build(W, to(a["A"]), to(a["ln_weight"]), to(a["ln_bias"]), config.ln_eps)


def check_arrays(shapes: dict[str, tuple[int, ...]], d_cal: int, target: "TargetFingerprint") -> None:
    d = target.hidden_size
    require_shapes(shapes, {"A": (d_cal, d), "ln_weight": (d,), "ln_bias": (d,)}, INTERPOLATE)


def default_alignment_text() -> str:
    """Path of the non-toxic sample text shipped for alignment (a user's clone has no training data)."""
    return str(Path(__file__).resolve().parent.parent / "resources" / "align_text.txt")


def align(inputs: AlignInputs, config: InterpolateConfig) -> Alignment:
    """Learn ``A`` and the LayerNorm against the target's output matrix (torch; see :mod:`detox.align_interpolate`)."""
    from detox.align_interpolate import align as learn
    from detox.data import read_texts, sha256_files

    data = inputs.data or [default_alignment_text()]
    texts = [t for p in data for t in read_texts(p)]
    arrays, metrics = learn(inputs.calibrator, inputs.W_out, inputs.target.tokenizer(), texts, inputs.vocabulary, config,
                            inputs.seed, inputs.progress, inputs.log)
    settings = {"ln_eps": config.ln_eps, "vocab_epochs": config.vocab_epochs, "vocab_negatives": config.vocab_negatives,
                "context_epochs": config.context_epochs, "data_sha256": sha256_files(data)}
    return Alignment(arrays, metrics, config.method, settings)


METHOD = FusionMethod(
    config=InterpolateConfig,
    build_head=build_head,
    check_arrays=check_arrays,
    align=align,
    cli_options=(
        CliOption("--data", "data", "text for contextual alignment. Default: the non-toxic sample shipped with detox.",
                  files=True),
        CliOption("--method", "method",
                  "'vocab' is the paper's InfoNCE over shared tokens; 'vocab+context' adds contextual alignment."),
        CliOption("--vocab-epochs", "vocab_epochs", "epochs of the vocabulary (InfoNCE) stage."),
        CliOption("--context-epochs", "context_epochs", "epochs of the contextual stage."),
        CliOption("--max-docs", "max_context_docs", "documents of --data used for contextual alignment."),
    ),
    chosen_by="one calibrator, no --anti-expert; its map is learned from the target's output matrix and text",
    needs_output_matrix=True,
    uses_anti_expert=False,
)
