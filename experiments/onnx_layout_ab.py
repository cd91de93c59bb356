"""A/B of the calibrator's ONNX graph layouts inside real decoding: unfused, fused with the 3.0.0 graphs (traced
export, stacked KV cache) and fused with the shipped artifact's graphs (ONNX Runtime's fused operators; 3.0.1 when
this was written, the pair in one graph since 3.0.2: see experiments/pair_graph_ab.py). The artifacts hold the same
weights, so the only difference between the fused arms is the graph. The three arms are interleaved in one
process; medians are printed.

    mkdir -p /tmp/v300 && for f in manifest.json calibrator.onnx anti_calibrator.onnx calibrator.safetensors \\
        anti_calibrator.safetensors alignment.safetensors tokenizer.json; do \\
        git show 454f17e:artifacts/shipped/smollm2-135m-instruct/$f > /tmp/v300/$f; done
    python experiments/onnx_layout_ab.py --legacy /tmp/v300 --backend hf|onnx|llamacpp [--tokens 32] [--repetitions 5]

The current runner refuses the old layout, so this script carries a minimal runner for it (comparison only).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from detox.cli import bench as cli_bench
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--legacy", required=True, type=Path, help="the 3.0.0 artifact directory (see above)")
    ap.add_argument("--backend", choices=["hf", "onnx", "llamacpp"], default="hf")
    ap.add_argument("--target", default=None, help="default: smollm2 (hf, llamacpp) or ~/.cache/detox/onnx/smollm2 (onnx)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--prompt", default="The city council met on Tuesday to discuss")
    args = ap.parse_args()

    legacy = Calibrator.load(args.legacy)
    legacy._onnx_runner = PairRunner(LegacyOnnxRunner(args.legacy / "calibrator.onnx"),
                                     LegacyOnnxRunner(args.legacy / "anti_calibrator.onnx"))
    target = args.target or (str(Path.home() / ".cache/detox/onnx/smollm2") if args.backend == "onnx" else "smollm2")

    def runners(calibrator: Calibrator | None):
        if args.backend == "onnx":
            return cli_bench._onnx_runners(target, calibrator, None, args.tokens, args.prompt, "cpu")
        return getattr(cli_bench, f"_{args.backend}_runners")(target, calibrator, None, args.tokens, args.prompt)

    plain, fused_new, new_cal, _ = runners(None)  # the shipped artifact matched by fingerprint
    _, fused_old, _, _ = runners(legacy)
    arms = {"unfused": plain, f"fused, {legacy.manifest.version} graphs": fused_old,
            f"fused, {new_cal.manifest.version} graphs": fused_new}
    for fn in arms.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repetitions):
        for name, fn in arms.items():
            start = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - start)
            if n != args.tokens:
                raise RuntimeError(f"{name} generated {n} tokens instead of {args.tokens}")
    base = statistics.median(times["unfused"])
    print(f"backend {args.backend}, {args.tokens} tokens, {args.repetitions} repetitions (median)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} {args.tokens / med:6.2f} tok/s   {1000 * med / args.tokens:6.2f} ms/token   {med / base:.3f}x")


if __name__ == "__main__":
    main()
