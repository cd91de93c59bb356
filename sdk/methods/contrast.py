"""``contrast``: an expert/anti-expert calibrator pair, read in its own vocabulary, on the target's plausible tokens.

The expert is trained on clean text (UniDetox-distilled in the shipped artifact), the anti-expert is the expert
fine-tuned on toxic text (``detox train --init EXPERT``). Each target token ``v`` is mapped by text to the calibrator
token its text starts with (``token_map``, the whole per-target alignment); on the target's plausible tokens::

    fused[v] = logits_target[v] + λ · min(0, log p_expert(map v) − log p_anti(map v))        (−inf elsewhere)

(``suppress_only``; without it the log-ratio is added as is). The shared math is in :mod:`detox.fusion`; see
docs/method.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import numpy as np
from pydantic import Field

from detox.fusion import CONTRAST, _is_torch, contrast_fuse, pair_log_ratio, top_candidates
from detox.methods.base import (
    AlignInputs, Alignment, Array, CliOption, FusionMethod, MethodConfig, as_arrays, require_shapes,
)
from detox.token_map import vocab_surfaces

if TYPE_CHECKING:
    from detox.artifacts.manifest import AlignmentInfo, TargetFingerprint
    from detox.runtime import Calibrator

TopK = Annotated[int, Field(ge=1)]
Plausibility = Annotated[float, Field(ge=0.0, le=1.0)]
Gate = Annotated[float, Field(gt=0.0, le=1.0)]


class ContrastConfig(MethodConfig):
    name: ClassVar[str] = CONTRAST
    max_strength: ClassVar[float] = 20.0

    default_strength: float = 8.0
    top_k: TopK = 64  # at most this many of the target's tokens are candidates ...
    plausibility: Plausibility = 0.001  # ... those with p ≥ plausibility · max p under the target
    suppress_only: bool = True  # use min(0, log-ratio): push down what the anti-expert prefers, boost nothing
    # with a token_scale (detox align --exempt-identity): apply it only to sequences whose prompt the shipped scorer
    # scores below this toxicity (the rest get the full rule); None: to every sequence
    exempt_gate: Gate | None = None

    def alignment_fields(self) -> dict[str, Any]:
        # manifest format 1 keeps the rule's settings at the top of "alignment" (AlignmentInfo), not in "settings"
        return self.model_dump()

    @classmethod
    def from_alignment(cls, al: "AlignmentInfo") -> "ContrastConfig":
        return cls.parse({k: getattr(al, k) for k in cls.model_fields})  # type: ignore[return-value]


@dataclass
class ContrastHead:
    """Expert/anti-expert fusion: the calibrators' own next-token distributions, read at the target's candidates.

    Both calibrators share one tokenizer; ``token_map`` sends each target token to the calibrator token that starts
    its text. Target tokens with no calibrator counterpart (``-1``: special or partial-byte tokens) get no change.
    ``token_scale`` (``detox align --exempt-identity``) scales the log-ratio per target token: 0 leaves a token alone.
    """

    token_map: Array  # [vocab_target] int, -1 = no counterpart
    expert_out: Array  # [vocab_cal, d_cal] the expert's (tied) output embedding
    anti_out: Array  # [vocab_cal, d_cal] the anti-expert's
    config: ContrastConfig = field(default_factory=ContrastConfig)  # top_k, plausibility, suppress_only
    token_scale: Array | None = None  # [vocab_target] float in [0, 1], the share of the log-ratio applied; None: all 1
    mode = CONTRAST

    @property
    def vocab_size(self) -> int:
        return int(self.token_map.shape[0])

    @property
    def device(self) -> Any:
        return getattr(self.expert_out, "device", None)

    @property
    def gate_threshold(self) -> float | None:
        """With ``token_scale``: the prompt toxicity (shipped scorer) below which the exemption applies
        (``config.exempt_gate``; :class:`detox.engine.FusionEngine` asks the scorer); ``None``: no gate."""
        return None if self.token_scale is None else self.config.exempt_gate

    def prepare(self, hidden: Array) -> Array:
        """``log p_expert − log p_anti`` over the calibrator vocabulary (``[..., vocab_cal]``) from the stacked states
        ``[..., 2, d_cal]`` (expert first); needs no target logits, so backends overlap it with the target's step."""
        return pair_log_ratio(hidden, self.expert_out, self.anti_out)

    def apply(self, logits: Array, prepared: Array, strength: float, exempt: Array | None = None) -> Array:
        """The fused logits from :meth:`prepare`'s output; never mutates ``logits``; λ = 0 returns them unchanged.
        ``exempt``: per row, whether ``token_scale`` applies (the engine's prompt gate); ``None``: it does."""
        if ContrastConfig.check_strength(strength) == 0.0:
            return logits * 1.0
        idx, keep = top_candidates(logits[..., : self.vocab_size], self.config.top_k, self.config.plausibility)
        return contrast_fuse(logits, idx, keep, self.ratio_at(prepared, idx, exempt), strength)

    def ratio_at(self, prepared: Array, idx: Array, exempt: Array | None = None) -> Array:
        """The log-ratio the rule adds at target tokens ``idx`` (``[..., k]``) from :meth:`prepare`'s output:
        0 for unmapped tokens, clipped at 0 with ``suppress_only``, times ``token_scale`` where the artifact has one
        (in the rows ``exempt`` marks, a bool per row; ``None``: every row)."""
        cal_ids = self.token_map[idx]
        mapped = cal_ids >= 0
        if _is_torch(prepared):
            ratio = prepared.gather(-1, cal_ids.clamp(min=0)) * mapped
        else:
            ratio = np.take_along_axis(prepared, np.maximum(cal_ids, 0), -1) * mapped
        ratio = ratio.clip(None, 0.0) if self.config.suppress_only else ratio  # torch and numpy alike
        if self.token_scale is None:
            return ratio
        scale = self.token_scale[idx]
        if exempt is not None:  # rows the gate does not exempt keep the full rule
            if _is_torch(scale):
                import torch

                scale = torch.where(torch.as_tensor(exempt, device=scale.device)[..., None], scale, 1.0)
            else:
                scale = np.where(np.asarray(exempt)[..., None], scale, np.float32(1.0))
        return ratio * scale


def build_head(calibrator: "Calibrator", W_out: Array, config: ContrastConfig) -> ContrastHead:
    """The head for a target of ``W_out``'s shape (its values are never read), on its framework and device."""
    a, anti = calibrator.alignment_arrays(), calibrator.artifact.anti_state
    if "token_map" not in a or anti is None:
        raise ValueError("a contrast artifact needs a token map and an anti-expert; re-run detox align")
    W, to, index = as_arrays(W_out)
    token_map = a["token_map"]
    if token_map.shape[0] > W.shape[0]:
        raise ValueError(f"token map covers {token_map.shape[0]} tokens, the target has {W.shape[0]}")
    key = "embed.weight"  # tied output embeddings
    scale = a.get("token_scale")
    return ContrastHead(index(token_map), to(calibrator.artifact.calibrator_state[key]), to(anti[key]), config,
                        None if scale is None else to(scale))


def check_arrays(shapes: dict[str, tuple[int, ...]], d_cal: int, target: "TargetFingerprint") -> None:
    require_shapes(shapes, {"token_map": None}, CONTRAST)
    if len(shapes["token_map"]) != 1 or shapes["token_map"][0] > target.vocab_size:
        raise ValueError(f"token_map is {list(shapes['token_map'])}, but the target has {target.vocab_size} tokens")
    if "token_scale" in shapes and shapes["token_scale"] != shapes["token_map"]:
        raise ValueError(f"token_scale is {list(shapes['token_scale'])}, but token_map is {list(shapes['token_map'])}")


def align(inputs: AlignInputs, config: ContrastConfig) -> Alignment:
    """A pair's per-target alignment is only the token map (built from the two vocabularies, no training).

    With ``inputs.exempt_terms`` (``detox align --exempt-identity``) the first tokens of the word list's terms get a
    ``token_scale`` of ``inputs.exempt_penalty`` (default 0: the rule never pushes them down), every other token 1:
    the fallback of docs/identity.md."""
    m, settings = dict(inputs.token_map_metrics), {}
    arrays = {"token_map": inputs.token_map}
    inputs.log(f"token map: {m['token_map_exact']:.1%} of target tokens exact, "
               f"{m['token_map_first_piece']:.1%} by first piece, {m['token_map_unmapped']:.1%} unmapped")
    if inputs.exempt_terms is not None:
        ids = sorted(inputs.exempt_terms.first_token_ids(vocab_surfaces(*inputs.vocabulary)))
        arrays["token_scale"] = np.ones(len(inputs.token_map), dtype=np.float32)
        arrays["token_scale"][ids] = inputs.exempt_penalty
        settings["exempt_identity"], m["exempt_tokens"] = inputs.exempt_terms.source, float(len(ids))
        settings["exempt_penalty"] = inputs.exempt_penalty
        inputs.log(f"{len(ids)} target tokens that start an identity term ({inputs.exempt_terms.source}) keep "
                   f"{inputs.exempt_penalty:g} of the suppression")
    return Alignment(arrays, m, "token-map", settings)


METHOD = FusionMethod(
    config=ContrastConfig,
    build_head=build_head,
    check_arrays=check_arrays,
    align=align,
    cli_options=(
        CliOption("--top-k", "top_k", "candidate tokens per step."),
        CliOption("--plausibility", "plausibility", "candidates need p ≥ plausibility · max p under the target."),
        CliOption("--suppress-only/--two-sided", "suppress_only",
                  "only push down tokens the anti-expert prefers (min(0, log-ratio))."),
    ),
    chosen_by="an expert/anti-expert pair: --anti-expert, or a contrast --calibrator; its alignment is a token map",
    needs_output_matrix=False,
    uses_anti_expert=True,
)
