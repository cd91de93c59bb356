"""A timing stand-in calibrator: the default architecture with random weights and a random alignment.

Per-step cost depends only on the shapes, not on the weights' values, so benchmarks can run where the shipped
calibrator does not fit the target. Built once per target fingerprint and cached; needs torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def build_standin(fp, cache_dir: Path, name: str = "bench-standin") -> Path:
    """Aligned artifact of the default calibrator shape bound to fingerprint ``fp``, cached under ``cache_dir``."""
    import torch

    import detox
    import detox.onnx_calibrator
    from detox.methods.interpolate import default_alignment_text
    from detox.artifacts.manifest import CALIBRATOR_ONNX
    from detox.artifacts.store import save_artifact
    from detox.calibrator import CalibratorLM
    from detox.config import CalibratorConfig
    from detox.onnx_calibrator import export_calibrator_onnx
    from detox.tokenizer import train_tokenizer

    exporter = hashlib.sha256(Path(detox.onnx_calibrator.__file__).read_bytes()).hexdigest()[:8]  # rebuild on change
    out = cache_dir / f"standin-{fp.output_embedding_sha256[:12]}-{exporter}"
    if (out / "manifest.json").is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    text = Path(default_alignment_text()).read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(text, vocab_size=8192, min_frequency=1)
    cfg = CalibratorConfig(vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = CalibratorLM(cfg).half().float().eval()  # artifacts store float16 weights
    g = np.random.default_rng(0)
    d_t = fp.hidden_size
    alignment = {"A": g.standard_normal((cfg.hidden_size, d_t), dtype=np.float32) / np.sqrt(cfg.hidden_size),
                 "ln_weight": np.ones(d_t, np.float32), "ln_bias": np.zeros(d_t, np.float32)}
    fields = {
        "kind": "aligned", "name": name, "version": "0.0.0", "detox_version": detox.__version__,
        "description": "random weights of the default calibrator shape, for checks and timing only",
        "calibrator": cfg,
        "training": {"data_sha256": hashlib.sha256(b"standin").hexdigest(), "num_documents": 0, "num_tokens": 0,
                     "steps": 0, "seed": 0},
        "alignment": {"method": "standin", "target": fp, "default_strength": 0.3, "seed": 0},
    }
    onnx = export_calibrator_onnx(model, cache_dir / f"{out.name}.onnx")
    save_artifact(out, fields, model.state_dict(), tok, alignment=alignment, overwrite=True,
                  extra_files={CALIBRATOR_ONNX: onnx})
    onnx.unlink()
    return out
