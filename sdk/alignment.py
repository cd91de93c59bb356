"""``detox align``: learn the map ``A`` (and the fusion LayerNorm) from calibrator space into a target's.

Two stages, both with the target frozen:

1. ``vocab`` — the paper's method (synlp/LLM-Detoxic): over token strings both vocabularies share, the
   calibrator's embedding row mapped through ``A`` must score its own target output-embedding row above
   ``n`` randomly sampled other shared tokens (InfoNCE). Cross-tokenizer: tokens are matched by the text
   they decode to, not by id.
2. ``context`` (default, on top of 1) — run the calibrator over shared text exactly as it runs during
   generation (its own tokens, re-tokenized from text) and train ``A`` and the LayerNorm so that the fusion
   term ``W_out·LayerNorm(h_cal·A)`` predicts the target's next token at every target-token boundary that
   is also a calibrator-token boundary. This aligns contextual states, not just embeddings, and learns the
   LayerNorm the paper leaves untrained.

Both stages (torch) live in :mod:`detox.align_interpolate`. A contrast pair's alignment is only a token map between
the two vocabularies (:func:`build_token_map`); with the target's streamed fingerprint it needs neither the target
model nor torch. See docs/align.md.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from detox.artifacts.manifest import CALIBRATOR_ONNX, MIN_MAPPED_SHARE, check_name_version
from detox.onnx_calibrator import INT8, check_weights_dtype
from detox.runtime import Calibrator


@dataclass
class AlignSettings:
    method: str = "vocab+context"  # "vocab" (paper) or "vocab+context"
    vocab_epochs: int = 8
    vocab_batch_size: int = 32
    vocab_negatives: int = 10
    vocab_lr: float = 1e-3
    context_epochs: int = 3
    context_batch_size: int = 256
    context_lr: float = 2e-3
    max_context_docs: int = 4000
    eval_fraction: float = 0.1
    ln_eps: float = 1e-5
    default_strength: float | None = None  # None: DEFAULT_STRENGTH of the fusion mode
    top_k: int = 64  # contrast fusion: candidate tokens per step ...
    plausibility: float = 0.001  # ... those with p ≥ plausibility · max p
    suppress_only: bool = True  # contrast fusion: only push down what the anti-expert prefers
    onnx_weights: str = INT8  # how calibrator.onnx stores its products' weights: "int8" (fast) or "float32" (exact)
    min_mapped_share: float = MIN_MAPPED_SHARE  # refuse a target whose vocabulary the calibrator mostly cannot read
    seed: int = 0


DEFAULT_STRENGTH = {"interpolate": 0.3, "contrast": 8.0}
_INTERPOLATE = ("AlignmentMap", "train_vocab_alignment", "context_examples", "train_context_alignment", "align")


def __getattr__(name: str) -> Any:
    """Interpolate alignment lives in :mod:`detox.align_interpolate` (torch), imported only when used."""
    if name in _INTERPOLATE:
        from detox import align_interpolate

        return getattr(align_interpolate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte↔printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def token_surface(token: str | None, byte_level: bool) -> str | None:
    """The text a vocabulary entry stands for (``Ġthe`` / ``▁the`` → `` the``); None if not a whole string."""
    if not token:
        return None
    if byte_level:
        try:
            return bytes(_BYTE_DECODER[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            return None
    if token.startswith("<") and token.endswith(">"):
        return None  # special / byte-fallback tokens like <0x0A>
    return token.replace("\u2581", " ")


def _is_byte_level(tokens: list[str | None]) -> bool:
    return sum(1 for t in tokens if t and t.startswith("Ġ")) > sum(1 for t in tokens if t and t.startswith("\u2581"))


def vocab_surfaces(tokens: list[str | None], special: set[str] = frozenset()) -> list[str | None]:
    byte_level = _is_byte_level(tokens)
    return [None if (t in special) else token_surface(t, byte_level) for t in tokens]


def shared_token_pairs(cal_tokens: list[str | None], target_tokens: list[str | None], target_special: set[str] = frozenset()) -> list[tuple[int, int]]:
    """``(calibrator id, target id)`` for every surface string present in both vocabularies."""
    target_index: dict[str, int] = {}
    for i, s in enumerate(vocab_surfaces(target_tokens, target_special)):
        if s and s not in target_index:
            target_index[s] = i
    pairs = []
    for i, s in enumerate(vocab_surfaces(cal_tokens, {"<|endoftext|>"})):
        if s and s in target_index:
            pairs.append((i, target_index[s]))
    return pairs


def build_token_map(cal_tokenizer: Any, target_tokens: list[str | None], target_special: set[str] = frozenset()) -> tuple[np.ndarray, dict[str, float]]:
    """For contrast fusion: each target token's calibrator counterpart, the calibrator token its text starts with.

    Returns ``(map [vocab_target] int32 with -1 for special / partial-byte tokens, metrics)``; the metrics say how
    many target tokens have an exact counterpart (same text) and how many only a first piece.
    """
    surfaces = vocab_surfaces(target_tokens, target_special)
    present = [i for i, s in enumerate(surfaces) if s]
    out = np.full(len(target_tokens), -1, dtype=np.int32)
    exact = 0
    encode = getattr(cal_tokenizer, "encode_batch_fast", cal_tokenizer.encode_batch)  # fast: no offsets (>= 0.21)
    for b in range(0, len(present), 16384):  # in batches: 262k encodings at once hold ~300 MB
        batch = present[b : b + 16384]
        for i, enc in zip(batch, encode([surfaces[i] for i in batch], add_special_tokens=False)):
            if enc.ids:
                out[i] = enc.ids[0]
                exact += len(enc.ids) == 1
    mapped = int((out >= 0).sum())
    return out, {"token_map_exact": exact / len(out), "token_map_first_piece": (mapped - exact) / len(out),
                 "token_map_unmapped": 1 - mapped / len(out)}


def check_mapped_share(share: float, n_tokens: int, target: str, minimum: float) -> None:
    """Refuse a target whose vocabulary the calibrator mostly cannot read (share = 1 − ``token_map_unmapped``).

    An unmapped target token (special, a byte fragment, text the calibrator cannot encode) is never steered: contrast
    fusion leaves it untouched, and interpolate alignment has no text to learn it from. Real targets map ≥ 99%
    (SmolLM2 99.3%, Gemma 3 97.5%: docs/align.md); a target below ``minimum`` (default 50%: then most of what it can
    say is out of reach) is almost certainly the wrong model or a vocabulary detox cannot read, and an artifact
    for it would change little while looking valid.
    """
    if share < minimum:
        raise ValueError(
            f"only {share:.1%} of the {n_tokens} tokens of {target} have text the calibrator can read (the rest are "
            f"special, byte-fragment or unreadable tokens), below the minimum mapped share {minimum:.0%}: the "
            "artifact would leave most of the target untouched. Check --target, or pass --min-mapped-share to accept it"
        )


def default_alignment_text() -> str:
    """Path of the non-toxic sample text shipped for alignment (a user's clone has no training data)."""
    return str(Path(__file__).resolve().parent / "resources" / "align_text.txt")


def load_anti_expert(expert: Calibrator, path: str) -> Calibrator:
    """The anti-expert calibrator for contrast fusion, checked to read text exactly as the expert does."""
    from detox.artifacts.store import ArtifactError

    anti = Calibrator.load(path)
    if anti.tokenizer.to_str() != expert.tokenizer.to_str() or anti.manifest.calibrator != expert.manifest.calibrator:
        raise ArtifactError(
            f"the anti-expert {path} must share the expert's tokenizer and architecture; make it from the expert: "
            f"detox train --init EXPERT --data toxic.txt --out ANTI"
        )
    return anti


def alignment_fusion(calibrator_path: str, anti_expert: str | None = None) -> str:
    """The fusion an alignment of ``calibrator_path`` will use: "contrast" with an anti-expert (given or kept from a
    contrast artifact), else "interpolate". Reads only the manifest."""
    from detox.artifacts.archive import read_archive_head
    from detox.artifacts.store import read_manifest

    if anti_expert:
        return "contrast"
    p = Path(calibrator_path)
    manifest = read_manifest(p) if p.is_dir() else read_archive_head(p)[0]
    return "contrast" if manifest.anti_expert is not None else "interpolate"


def align_artifact(calibrator_path: str, target: str, out_dir: str, data: list[str] | None = None,
                   settings: AlignSettings | None = None, name: str | None = None, version: str | None = None,
                   progress: bool = True, overwrite: bool = False, log: Callable[[str], None] = print,
                   anti_expert: str | None = None) -> Any:
    """Align a trained calibrator to a target and write an aligned artifact bound to the target.

    The target model is never loaded: its vocabulary, tokenizer and output matrix are read from its files (a GGUF's
    metadata and de-quantized output tensor, a HF directory's tokenizer and safetensors head), and its fingerprint is
    hashed chunk by chunk, so memory does not grow with the target's depth. A target whose vocabulary the calibrator
    mostly cannot read is refused (``settings.min_mapped_share``); nothing is written then.

    ``anti_expert``: a calibrator made from this one by ``detox train --init`` on toxic text. The artifact then
    uses contrast fusion (``target + λ·(log p_expert − log p_anti)`` on the target's plausible tokens, see
    :class:`detox.fusion.ContrastHead`), whose per-target alignment is only a map between the two vocabularies.
    """
    import time

    import detox
    from detox.artifacts.store import save_artifact
    from detox.data import read_texts, sha256_files
    from detox.fingerprint import fingerprint_files
    from detox.targets import locate_target

    check_name_version(name, version)
    s = settings or AlignSettings()
    check_weights_dtype(s.onnx_weights, "onnx_weights")
    t0 = time.perf_counter()
    calibrator = Calibrator.load(calibrator_path)
    anti: tuple[Any, dict[str, Any], Callable[[], Any]] | None = None  # (training info, weights, its torch model)
    if anti_expert:
        a = load_anti_expert(calibrator, anti_expert)
        anti = (a.manifest.training, a.artifact.calibrator_state, a.torch_model)
    elif calibrator.has_anti_expert:  # re-aligning a contrast artifact (e.g. to a new target) keeps its pair
        anti = (calibrator.manifest.anti_expert, calibrator.artifact.anti_state, lambda: calibrator.torch_model("anti"))
    fusion = "contrast" if anti is not None else "interpolate"
    if anti is not None and data:
        raise ValueError("alignment text (--data) is only used by interpolate alignment; a contrast pair's alignment "
                         "is a token map built from the two vocabularies. Drop --data.")
    files = locate_target(target)
    tokens, special = files.vocabulary()
    token_map, metrics = build_token_map(calibrator.tokenizer, tokens, special)
    mapped_share = 1.0 - metrics["token_map_unmapped"]
    check_mapped_share(mapped_share, len(tokens), files.name, s.min_mapped_share)
    log(f"reading {files.path}'s output matrix (streamed; the model is not loaded)")
    # contrast fusion reads both calibrators in their own vocabulary: only a token map is learned, and the output
    # matrix is only hashed (chunk by chunk); interpolate alignment trains against the whole matrix
    fingerprint, W_out = fingerprint_files(files, keep_output=anti is None, progress=progress)
    if anti is not None:
        arrays = {"token_map": token_map}
        log(f"token map: {metrics['token_map_exact']:.1%} of target tokens exact, "
            f"{metrics['token_map_first_piece']:.1%} by first piece, {metrics['token_map_unmapped']:.1%} unmapped")
    else:
        data = data or [default_alignment_text()]
        texts = [t for p in data for t in read_texts(p)]
        from detox.align_interpolate import align

        arrays, metrics = align(calibrator, W_out, files.tokenizer(), texts, s, progress, log, (tokens, special))
        del W_out
    metrics["align_seconds"] = time.perf_counter() - t0
    m = calibrator.manifest
    recorded: dict[str, Any] = {"onnx_weights": s.onnx_weights}  # the manifest's alignment.settings
    if anti is None:  # a contrast pair's token map has no training settings
        recorded.update(ln_eps=s.ln_eps, vocab_epochs=s.vocab_epochs, vocab_negatives=s.vocab_negatives,
                        context_epochs=s.context_epochs, data_sha256=sha256_files(data))
    fields = {
        "kind": "aligned",
        "name": name or m.name,
        "version": version or m.version,
        "detox_version": detox.__version__,
        "description": f"{m.name}@{m.version} aligned to {fingerprint.name}"
        + (" (contrast fusion with an anti-expert)" if anti is not None else ""),
        "calibrator": m.calibrator,
        "training": m.training,
        "alignment": {
            "method": "token-map" if anti is not None else s.method,
            "target": fingerprint,
            "fusion": fusion,
            "default_strength": DEFAULT_STRENGTH[fusion] if s.default_strength is None else s.default_strength,
            "top_k": s.top_k,
            "plausibility": s.plausibility,
            "suppress_only": s.suppress_only,
            "seed": s.seed,
            "mapped_share": mapped_share,
            "metrics": metrics,
            "settings": recorded,
        },
        "anti_expert": anti[0] if anti is not None else None,
    }
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # torch-free backends (llama.cpp) run the calibrator from ONNX
        kept = None if anti_expert else reusable_onnx(calibrator, anti is not None, s.onnx_weights)
        extra = {CALIBRATOR_ONNX: kept} if kept else onnx_exports(calibrator.torch_model(), anti[2]() if anti else None,
                                                                  tmp, log, s.onnx_weights)
        return save_artifact(out_dir, fields, calibrator.artifact.calibrator_state, calibrator.tokenizer,
                             alignment=arrays, overwrite=overwrite, extra_files=extra,
                             anti_state=anti[1] if anti is not None else None)


def reusable_onnx(calibrator: Calibrator, pair: bool, weights_dtype: str) -> Path | None:
    """The ``calibrator.onnx`` of an aligned ``calibrator`` being re-aligned with its own weights (and pair), when it
    is the graph this detox would export: same layout, model count and weight type. The graph never depends on the
    target, and the file's sha256 was verified at load, so re-exporting it would only cost time and memory (6 s and
    300 MB for the shipped pair on a busy 2-core machine). ``None`` when it must be exported."""
    from detox.onnx_calibrator import LAYOUT, ROTARY_POSITIONS

    if CALIBRATOR_ONNX not in calibrator.manifest.files or importlib.util.find_spec("onnx") is None:
        return None
    import onnx

    path = calibrator.path / CALIBRATOR_ONNX
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    wanted = {"layout": LAYOUT, "rotary_positions": str(ROTARY_POSITIONS), "models": str(2 if pair else 1),
              "weights_dtype": weights_dtype}
    return path if props == wanted else None


def onnx_exports(expert: Any, anti: Any | None, tmp_dir: str, log: Callable[[str], None] = print,
                 weights_dtype: str = INT8) -> dict[str, Any]:
    """``calibrator.onnx`` (with ``anti``: the expert/anti-expert pair in one graph; products' weights stored as
    ``weights_dtype``) written into ``tmp_dir``, as ``save_artifact``'s ``extra_files``; none, with a note, when the
    ``onnx`` package is missing."""
    from detox.onnx_calibrator import export_calibrator_onnx

    if importlib.util.find_spec("onnx") is None:
        log(f"note: not writing {CALIBRATOR_ONNX}, which the llama.cpp backend needs: pip install onnx, then re-run")
        return {}
    return {CALIBRATOR_ONNX: export_calibrator_onnx(expert, Path(tmp_dir) / CALIBRATOR_ONNX, anti=anti,
                                                    weights_dtype=weights_dtype)}


def reexport_onnx(src: str, out_dir: str, version: str | None = None, overwrite: bool = False,
                  onnx_weights: str = INT8) -> Any:
    """Copy the aligned artifact ``src`` to ``out_dir`` with its ONNX calibrators exported again by this detox,
    the products' weights stored as ``onnx_weights`` (``"int8"`` or ``"float32"``, see
    :func:`detox.onnx_calibrator.build_calibrator_graph`).

    Weights, tokenizer, alignment and metadata are kept; only the ``.onnx`` files (and so the hashes) and the
    alignment's ``onnx_weights`` setting change, so the copy gets a new ``version`` (default: the next patch
    version). This is how an artifact exported by an older detox, whose graph layout this one no longer runs, is
    brought up to date without its target model. The copy is unsigned (its manifest differs): sign it again with
    ``detox artifacts sign``. Returns the new manifest.
    """
    import tempfile
    from datetime import datetime, timezone

    from detox.artifacts.semver import Version
    from detox.artifacts.store import ArtifactError, save_artifact

    check_weights_dtype(onnx_weights, "onnx_weights")
    cal = Calibrator.load(src)
    m = cal.manifest
    if m.kind != "aligned":
        raise ArtifactError(f"{src} is a {m.kind} calibrator; only aligned artifacts carry ONNX exports")
    if version is None:
        old = Version.parse(m.version)
        version = f"{old.major}.{old.minor}.{old.patch + 1}"
    check_name_version(version=version)
    if version == m.version:
        raise ArtifactError(f"the re-exported artifact must get a new version (artifacts are immutable); {src} is {version}")
    fields = m.model_dump(exclude={"files", "format_version"})
    fields.update(version=version, created_at=datetime.now(timezone.utc))
    fields["alignment"]["settings"]["onnx_weights"] = onnx_weights
    anti = cal.torch_model("anti") if cal.has_anti_expert else None
    with tempfile.TemporaryDirectory() as tmp:
        extra = onnx_exports(cal.torch_model(), anti, tmp, weights_dtype=onnx_weights)
        if not extra:
            raise ArtifactError("re-exporting needs the onnx package: pip install onnx")
        return save_artifact(out_dir, fields, cal.artifact.calibrator_state, cal.tokenizer,
                             alignment=cal.artifact.alignment, overwrite=overwrite, extra_files=extra,
                             anti_state=cal.artifact.anti_state)
