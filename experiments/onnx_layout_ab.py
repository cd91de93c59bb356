"""A/B of the calibrator's ONNX graph layouts inside real decoding: unfused, fused with the 3.0.0 graphs (traced
export, stacked KV cache) and fused with the shipped artifact's graphs (ONNX Runtime's fused operators; 3.0.1 when
this was written, the pair in one graph since 3.0.2: see experiments/pair_graph_ab.py). The artifacts hold the same
weights, so the only difference between the fused arms is the graph. The three arms are interleaved in one
process; medians are printed.

    detox artifacts pull smollm2-135m-instruct@3.0.0 --registry REGISTRY --out /tmp/v300
    python experiments/onnx_layout_ab.py --legacy /tmp/v300 --backend hf|onnx|llamacpp [--tokens 32] [--repetitions 5]

(the 3.0.0 artifact from a registry it was published to, or any local copy of it: a directory or ``.detox`` file)

The current runner refuses the old layout, so this script carries a minimal runner for it (comparison only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ab_common import ab_parser, report, target_of
from detox.bench import time_arms
from detox.cli.bench import runners_for
from detox.onnx_calibrator import session_options
from detox.runtime import Calibrator
from detox.stream import PairRunner


class LegacyOnnxRunner:
    """Runs a 3.0.0-layout ``calibrator.onnx``: inputs ``input_ids, past_k, past_v``, caches stacked over layers."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.path = path  # the same session options as the current runner (and as the 3.0.0 runner used)
        self.session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        layers, _, heads, _, head_dim = self.session.get_inputs()[1].shape
        self.shape = (int(layers), 1, int(heads), 0, int(head_dim))

    def empty_state(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(self.shape, np.float32), np.zeros(self.shape, np.float32)

    def run(self, ids: list[int], state: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        hidden, k, v = self.session.run(None, {"input_ids": np.asarray([ids], np.int64), "past_k": state[0], "past_v": state[1]})
        return hidden[0, -1], (k, v)


def main() -> None:
    ap = ab_parser(__doc__)
    ap.add_argument("--legacy", required=True, type=Path,
                    help="the 3.0.0 artifact (directory or .detox), e.g. from `detox artifacts pull` (see above)")
    args = ap.parse_args()

    legacy = Calibrator.load(args.legacy)
    legacy._onnx_runner = PairRunner(LegacyOnnxRunner(legacy.path / "calibrator.onnx"),
                                     LegacyOnnxRunner(legacy.path / "anti_calibrator.onnx"))
    target = target_of(args)

    plain, fused_new, new_cal, _ = runners_for(args.backend, target, None, None, args.tokens, args.prompt, "cpu")
    _, fused_old, _, _ = runners_for(args.backend, target, legacy, None, args.tokens, args.prompt, "cpu")
    arms = {"unfused": plain, f"fused, {legacy.manifest.version} graphs": fused_old,
            f"fused, {new_cal.manifest.version} graphs": fused_new}
    for name, fn in arms.items():  # warm-up; each arm must decode the requested number of tokens
        if fn() != args.tokens:
            raise RuntimeError(f"{name} did not generate {args.tokens} tokens")
    report(args, time_arms(arms, args.repetitions))


if __name__ == "__main__":
    main()
