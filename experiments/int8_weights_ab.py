"""A/B of how the calibrator graph stores its weights, all arms interleaved in one process (medians printed):

* unfused;
* "float32 graph": the shipped artifact's pair exported with float32 products (how 3.0.2 ran);
* "int8 graph": the same pair with 8-bit block-quantized products (``MatMulNBits``), how 3.1.0 runs.

    python experiments/int8_weights_ab.py --backend hf|onnx|llamacpp [--tokens 32] [--repetitions 5]

Greedy decoding of a fixed number of tokens; both artifacts are made here from the shipped one with
``detox.artifact_onnx.reexport_onnx`` (same weights, only calibrator.onnx differs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ab_common import ab_parser, report, target_of
from detox.artifact_onnx import reexport_onnx
from detox.artifacts.shipped import default_calibrator_path
from detox.bench import time_arms
from detox.cli.bench import runners_for


def main() -> None:
    args = ab_parser(__doc__).parse_args()
    target = target_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        arms = {}
        for dtype in ("float32", "int8"):
            path = Path(tmp) / dtype
            m = reexport_onnx(str(default_calibrator_path()), str(path), version="99.0.0", onnx_weights=dtype)
            plain, fused, _, _ = runners_for(args.backend, target, str(path), None, args.tokens, args.prompt, "cpu")
            arms.setdefault("unfused", plain)
            arms[f"{dtype} graph"] = fused
        print(f"calibrator: {m.name} (weights of the shipped artifact)")
        for fn in arms.values():  # warm-up
            fn()
        report(args, time_arms(arms, args.repetitions))


if __name__ == "__main__":
    main()
