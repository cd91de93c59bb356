"""Issue 21: mix two calibrators' weights, alpha·A + (1 − alpha)·B, into a new calibrator artifact (an experiment).

Two anti-experts fine-tuned from the same expert on the same data and steps, one with the mention of a group in its
loss and one without (``detox train`` A3 and ``experiments/masked_anti.py --mask identity`` A4), differ only in the
mask; a weight-space interpolation between them (a "model soup" along the mask axis) is a partial mask without any
training. The result is an ordinary calibrator artifact for ``detox align --anti-expert``:

    python experiments/mix_anti.py --a /tmp/h21b/pairs/A3 --b /tmp/h21b/pairs/A4 --alpha 0.5 --out /tmp/h21c/M50

Both inputs must be unaligned calibrators with the same tokenizer, architecture and parameter shapes. The weights
are mixed in float32 and stored as every calibrator is (float16, ``detox.artifacts.store.save_artifact``); the
manifest keeps A's training record and names both sources and alpha in its description.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def mix_calibrators(a_path: str, b_path: str, alpha: float, out: Path, name: str, version: str):
    """Write ``alpha·A + (1 − alpha)·B`` as a calibrator artifact at ``out``; ValueError (one line) on a mismatch."""
    import detox
    from detox.artifacts.cache import load_artifact

    a, b = load_artifact(a_path), load_artifact(b_path)
    for p, art in ((a_path, a), (b_path, b)):
        if art.manifest.kind != "calibrator":
            raise ValueError(f"{p} is an {art.manifest.kind} artifact; mix the unaligned calibrators, then align")
    if a.manifest.calibrator != b.manifest.calibrator:
        diff = [k for k, v in a.manifest.calibrator.model_dump().items() if getattr(b.manifest.calibrator, k) != v]
        raise ValueError(f"{a_path} and {b_path} have different architectures ({', '.join(diff)}); "
                         "mix only calibrators fine-tuned from the same init")
    if a.tokenizer.to_str() != b.tokenizer.to_str():
        raise ValueError(f"{a_path} and {b_path} have different tokenizers; mix only calibrators fine-tuned from "
                         "the same init")
    if a.calibrator_state.keys() != b.calibrator_state.keys():
        raise ValueError(f"{a_path} and {b_path} have different parameter names "
                         f"({sorted(a.calibrator_state.keys() ^ b.calibrator_state.keys())[:3]} …)")
    bad = [k for k, v in a.calibrator_state.items() if v.shape != b.calibrator_state[k].shape]
    if bad:
        raise ValueError(f"{a_path} and {b_path}: parameter {bad[0]} has shape {a.calibrator_state[bad[0]].shape} "
                         f"against {b.calibrator_state[bad[0]].shape}")
    state = {k: alpha * v.astype(np.float32) + (1.0 - alpha) * b.calibrator_state[k].astype(np.float32)
             for k, v in a.calibrator_state.items()}

    def src(p: str, art) -> str:
        m = art.manifest
        return (f"{m.name}@{m.version} ({p}, calibrator.safetensors sha256 "
                f"{m.files['calibrator.safetensors'].sha256[:12]}, data {m.training.data_sha256[:12]}, "
                f"{m.training.steps} steps)")

    from detox.artifacts.store import save_artifact

    return save_artifact(out, {
        "kind": "calibrator", "name": name, "version": version, "detox_version": detox.__version__,
        "description": f"weight mix, not trained: {alpha:g} x {src(a_path, a)} + {1 - alpha:g} x {src(b_path, b)} "
                       "(experiments/mix_anti.py); training record: the first one's",
        "calibrator": a.manifest.calibrator, "training": a.manifest.training,
    }, state, a.tokenizer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="calibrator artifact A (weight alpha)")
    ap.add_argument("--b", required=True, help="calibrator artifact B (weight 1 - alpha)")
    ap.add_argument("--alpha", type=float, required=True, help="A's weight; 0 gives B, 1 gives A")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default=None, help="default: mix-aNNN, NNN = alpha in percent")
    ap.add_argument("--version", default="0.1.0")
    args = ap.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        ap.error(f"--alpha {args.alpha}: must lie in [0, 1] (an extrapolation is not a mix)")
    name = args.name or f"mix-a{round(args.alpha * 100):03d}"
    try:
        m = mix_calibrators(args.a, args.b, args.alpha, args.out, name, args.version)
    except ValueError as e:  # detox's ArtifactError (an invalid artifact) is a ValueError too
        sys.exit(f"mix_anti.py: error: {e}")
    print(f"wrote {args.out}: {m.name}@{m.version}, {m.description}")


if __name__ == "__main__":
    main()
