"""The ``calibrator.onnx`` an aligned artifact carries for torch-free backends: kept when re-aligning, exported
otherwise, and exported again into a new version of an artifact (``detox artifacts reexport-onnx``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from detox.artifacts.manifest import CALIBRATOR_ONNX, check_name_version
from detox.artifacts.semver import Version
from detox.artifacts.store import ArtifactError, save_artifact
from detox.onnx_calibrator import INT8, LAYOUT, ROTARY_POSITIONS, check_weights_dtype, export_calibrator_onnx
from detox.runtime import Calibrator


def reusable_onnx(calibrator: Calibrator, pair: bool, weights_dtype: str) -> Path | None:
    """The ``calibrator.onnx`` of an aligned ``calibrator`` re-aligned with its own weights (and pair), when it is the
    graph this detox would export (``None`` otherwise): the graph never depends on the target and its sha256 was
    verified at load, so re-exporting it would only cost time and memory (6 s and 300 MB for the shipped pair)."""
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
    if importlib.util.find_spec("onnx") is None:
        log(f"note: not writing {CALIBRATOR_ONNX}, which the llama.cpp backend needs: pip install onnx, then re-run")
        return {}
    return {CALIBRATOR_ONNX: export_calibrator_onnx(expert, Path(tmp_dir) / CALIBRATOR_ONNX, anti=anti,
                                                    weights_dtype=weights_dtype)}


def reexport_onnx(src: str, out_dir: str, version: str | None = None, overwrite: bool = False,
                  onnx_weights: str = INT8) -> Any:
    """Copy the aligned artifact ``src`` to ``out_dir`` with its ONNX calibrators exported again by this detox
    (products' weights as ``onnx_weights``): how an artifact of an older graph layout is brought up to date without
    its target model (docs/artifacts.md). Everything else is kept; the copy gets a new ``version`` (default: the next
    patch version) and is unsigned. Returns the new manifest.
    """
    import tempfile
    from datetime import datetime, timezone

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
