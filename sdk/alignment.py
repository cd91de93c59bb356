"""``detox align``: bind a trained calibrator to one target model (target frozen, never loaded).

What every fusion method shares lives here: the target's vocabulary, the token map between the two vocabularies
(:mod:`detox.token_map`) and the refusal of a target the calibrator mostly cannot read, the target's fingerprint
(streamed), the anti-expert of a pair, the ONNX calibrator (:mod:`detox.artifact_onnx`) and the artifact's manifest.
What a method learns per target is its aligner's (:mod:`detox.methods`): ``interpolate`` learns the map ``A`` and
the fusion LayerNorm against the target's output matrix, ``contrast`` keeps only the token map. See docs/align.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from detox.artifact_onnx import onnx_exports, reusable_onnx
from detox.artifacts.archive import read_archive_head
from detox.artifacts.manifest import CALIBRATOR_ONNX, MIN_MAPPED_SHARE, check_name_version
from detox.artifacts.store import ArtifactError, read_manifest, save_artifact
from detox.fingerprint import fingerprint_files
from detox.fusion import CONTRAST, INTERPOLATE
from detox.methods import FusionMethod, MethodConfig, get_method
from detox.methods.base import AlignInputs
from detox.onnx_calibrator import INT8, check_weights_dtype
from detox.runtime import Calibrator
from detox.scorer_base import shipped_scorer_label
from detox.targets import locate_target
from detox.token_map import build_token_map, check_mapped_share


@dataclass
class AlignSettings:
    """What every alignment takes; the fusion method's own settings are its config (:mod:`detox.methods`)."""

    fusion: MethodConfig | None = None  # the method and its settings; None: see align_artifact
    onnx_weights: str = INT8  # how calibrator.onnx stores its products' weights: "int8" (fast) or "float32" (exact)
    min_mapped_share: float = MIN_MAPPED_SHARE  # refuse a target whose vocabulary the calibrator mostly cannot read
    seed: int = 0
    # contrast only: "builtin" or a word-list JSON file whose terms' first tokens the rule never pushes down; None:
    # keep the calibrator's own built-in exemption when it has one (re-aligning), "none": no exemption
    exempt_identity: str | None = None
    exempt_penalty: float = 0.0  # the share of the suppression those tokens keep, in [0, 1)
    exempt_gate: float | None = None  # exempt only prompts the shipped scorer scores below this toxicity; None: all


def _read_head(calibrator_path: str) -> Any:
    p = Path(calibrator_path)
    return read_manifest(p) if p.is_dir() else read_archive_head(p)[0]


def carry_exemption(calibrator_path: str, s: AlignSettings, log: Callable[[str], None]) -> AlignSettings:
    """The exemption settings of an alignment of ``calibrator_path``: re-aligning an artifact aligned with the
    built-in word list (e.g. the shipped default, to another target) keeps its exemption, penalty and gate unless
    ``--exempt-identity`` is given (``none`` drops it); an exemption from a word-list file is not carried (the file
    need not exist here), and a note says so. Reads only the manifest."""
    if s.exempt_identity == "none":
        return replace(s, exempt_identity=None)
    al = _read_head(calibrator_path).alignment
    was = al.settings.get("exempt_identity") if al else None
    if s.exempt_identity is not None or not was:
        return s
    if was != "built-in":
        log(f"note: {calibrator_path} exempted identity terms ({was}); this alignment does not: pass "
            "--exempt-identity FILE to keep that")
        return s
    penalty = s.exempt_penalty or float(al.settings.get("exempt_penalty", 0.0))
    gate = s.exempt_gate if s.exempt_gate is not None else al.exempt_gate
    log(f"keeping {calibrator_path}'s identity exemption (built-in word list, penalty {penalty:g}, gate "
        f"{'none' if gate is None else f'{gate:g}'}); --exempt-identity none drops it")
    return replace(s, exempt_identity="builtin", exempt_penalty=penalty, exempt_gate=gate)


def alignment_fusion(calibrator_path: str, anti_expert: str | None = None, name: str | None = None) -> FusionMethod:
    """The fusion method an alignment of ``calibrator_path`` uses: ``name`` when given (checked to fit the
    anti-expert), else contrast with an anti-expert (given, or kept from a contrast artifact), else interpolate.
    Reads only the manifest."""
    kept = not anti_expert and _read_head(calibrator_path).anti_expert is not None
    pair = bool(anti_expert) or kept
    if name is None:
        return get_method(CONTRAST if pair else INTERPOLATE)
    method = get_method(name)
    if method.uses_anti_expert and not pair:
        raise ValueError(f"{name} fusion needs an anti-expert: pass --anti-expert (the expert fine-tuned on toxic text: "
                         "detox train --init EXPERT --data toxic.txt --out ANTI)")
    if pair and not method.uses_anti_expert:
        raise ValueError(f"{name} fusion uses no anti-expert, but " + (f"--anti-expert {anti_expert} was given"
                         if anti_expert else f"{calibrator_path} is a pair that keeps its own") + "; "
                         "drop --anti-expert, or align the expert calibrator alone")
    return method


def align_artifact(calibrator_path: str, target: str, out_dir: str, data: list[str] | None = None,
                   settings: AlignSettings | None = None, name: str | None = None, version: str | None = None,
                   progress: bool = True, overwrite: bool = False, log: Callable[[str], None] = print,
                   anti_expert: str | None = None) -> Any:
    """Align a trained calibrator to a target and write an aligned artifact bound to the target.

    The target model is never loaded, only read from its files, so memory does not grow with its depth
    (docs/align.md); a target whose vocabulary the calibrator mostly cannot read is refused, and nothing is written.
    ``anti_expert``: the expert fine-tuned on toxic text (``detox train --init``), for contrast fusion.
    ``settings.fusion``: the method's config, which also chooses the method (default: see :func:`alignment_fusion`).
    """
    import tempfile
    import time

    import detox

    check_name_version(name, version)
    s = settings or AlignSettings()
    check_weights_dtype(s.onnx_weights, "onnx_weights")
    method = alignment_fusion(calibrator_path, anti_expert, s.fusion.name if s.fusion else None)
    config = s.fusion or method.config()
    if data and not any(o.files for o in method.cli_options):
        raise ValueError(f"alignment text (--data) is not read by {method.name} fusion ({method.chosen_by}). "
                         "Drop --data.")
    carried: list[str] = []  # said once the target has been read: a bad target gets its one line of error only
    s = carry_exemption(calibrator_path, s, carried.append)
    exempt = None
    if s.exempt_identity is not None:
        if not method.uses_anti_expert:
            raise ValueError(f"--exempt-identity applies to contrast fusion only, not {method.name}; drop it")
        from detox.identity import IdentityTerms

        exempt = IdentityTerms.load(None if s.exempt_identity == "builtin" else s.exempt_identity)
    elif s.exempt_penalty or s.exempt_gate is not None:
        raise ValueError(f"{'--exempt-penalty' if s.exempt_penalty else '--exempt-gate'} needs --exempt-identity "
                         "builtin|FILE (the tokens it applies to)")
    if not 0.0 <= s.exempt_penalty < 1.0:
        raise ValueError(f"--exempt-penalty must be in [0, 1) (0: no suppression of identity terms, 1 would be no "
                         f"exemption), got {s.exempt_penalty}")
    if s.exempt_gate is not None:  # a setting of the rule, read at run time: it lives in the method's config
        config = config.parse({**config.model_dump(), "exempt_gate": s.exempt_gate})
    # the gate asks the shipped scorer: record which one, so that FusionEngine can tell when another one judges
    gate_scorer = {} if s.exempt_gate is None else {"exempt_gate_scorer": shipped_scorer_label()}
    t0 = time.perf_counter()
    calibrator = Calibrator.load(calibrator_path)
    m = calibrator.manifest
    anti: tuple[Any, dict[str, Any], Callable[[], Any]] | None = None  # (training info, weights, its torch model)
    if anti_expert:  # it must read text exactly as the expert does
        a = Calibrator.load(anti_expert)
        if a.tokenizer.to_str() != calibrator.tokenizer.to_str() or a.manifest.calibrator != m.calibrator:
            raise ArtifactError(f"the anti-expert {anti_expert} must share the expert's tokenizer and architecture; "
                                "make it from the expert: detox train --init EXPERT --data toxic.txt --out ANTI")
        anti = (a.manifest.training, a.artifact.calibrator_state, a.torch_model)
    elif calibrator.has_anti_expert:  # re-aligning a contrast artifact (e.g. to a new target) keeps its pair
        anti = (calibrator.manifest.anti_expert, calibrator.artifact.anti_state, lambda: calibrator.torch_model("anti"))
    files = locate_target(target)
    tokens, special = files.vocabulary()
    token_map, map_metrics = build_token_map(calibrator.tokenizer, tokens, special)
    mapped_share = 1.0 - map_metrics["token_map_unmapped"]
    check_mapped_share(mapped_share, len(tokens), files.name, s.min_mapped_share)
    for note in carried:
        log(note)
    log(f"reading {files.path}'s output matrix (streamed; the model is not loaded)")
    # a method that does not learn against the output matrix (contrast) only hashes it, chunk by chunk
    fingerprint, W_out = fingerprint_files(files, keep_output=method.needs_output_matrix, progress=progress)
    inputs = AlignInputs(calibrator, files, (tokens, special), token_map, map_metrics, W_out, data, s.seed, progress,
                         log, exempt, s.exempt_penalty)
    del W_out
    aligned = method.align(inputs, config)
    del inputs
    metrics = {**aligned.metrics, "align_seconds": time.perf_counter() - t0}
    fields = {
        "kind": "aligned",
        "name": name or m.name,
        "version": version or m.version,
        "detox_version": detox.__version__,
        "description": f"{m.name}@{m.version} aligned to {fingerprint.name}"
        + (f" ({method.name} fusion with an anti-expert)" if anti is not None else ""),
        "calibrator": m.calibrator,
        "training": m.training,
        "alignment": {
            "method": aligned.method,
            "target": fingerprint,
            "fusion": method.name,
            **config.alignment_fields(),
            "seed": s.seed,
            "mapped_share": mapped_share,
            "metrics": metrics,
            "settings": {"onnx_weights": s.onnx_weights, **aligned.settings, **gate_scorer},
        },
        "anti_expert": anti[0] if anti is not None else None,
    }
    with tempfile.TemporaryDirectory() as tmp:  # torch-free backends (llama.cpp) run the calibrator from ONNX
        kept = None if anti_expert else reusable_onnx(calibrator, anti is not None, s.onnx_weights)
        extra = {CALIBRATOR_ONNX: kept} if kept else onnx_exports(calibrator.torch_model(), anti[2]() if anti else None,
                                                                  tmp, log, s.onnx_weights)
        return save_artifact(out_dir, fields, calibrator.artifact.calibrator_state, calibrator.tokenizer,
                             alignment=aligned.arrays, overwrite=overwrite, extra_files=extra,
                             anti_state=anti[1] if anti is not None else None)
