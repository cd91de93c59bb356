"""What int8 weights cost in accuracy and save per step, on the shipped pair, outside decoding:

* the error of the pair's suppress-only log-ratio ``min(0, log p_expert − log p_anti)`` (what contrast fusion adds,
  before λ) of the int8 graph against the float32 graph, token by token over development prompts;
* one cached step of each graph after a 240 MB pass (cold caches, as after the target's forward pass), median of 40.

    python experiments/int8_weights_error.py --prompts DATA/prompts_dev.jsonl [--every 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from detox.artifacts.shipped import default_calibrator_path
from detox.onnx_calibrator import OnnxRunner, build_calibrator_graph
from detox.runtime import Calibrator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True,
                    help="prompts JSONL as `detox eval --prompts` reads it (the development set: prompts_dev.jsonl)")
    ap.add_argument("--every", type=int, default=12, help="use every N-th prompt")
    args = ap.parse_args()
    cal = Calibrator.load(default_calibrator_path())
    pair = [{k: np.asarray(v, np.float32) for k, v in state.items()}
            for state in (cal.artifact.calibrator_state, cal.artifact.anti_state)]
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "int8"):
            path = Path(tmp) / f"{dtype}.onnx"
            onnx.save(build_calibrator_graph(pair, cal.manifest.calibrator, dtype), str(path))
            runners[dtype] = OnnxRunner(path)
        lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()[:: args.every]
        errors = []
        for line in lines:
            ids = [cal.manifest.calibrator.bos_token_id] + cal.tokenizer.encode(json.loads(line)["text"]).ids
            states = {d: r.empty_state() for d, r in runners.items()}
            for i in ids:
                out = {}
                for d, r in runners.items():
                    out[d], states[d] = r.run([i], states[d])
                errors.append(np.abs(np.minimum(out["int8"], 0) - np.minimum(out["float32"], 0)))
        e = np.concatenate(errors)
        print(f"{len(errors)} positions of {len(lines)} prompts: |error| of the suppress-only log-ratio (nats): "
              f"mean {e.mean():.4f}, p99 {np.quantile(e, 0.99):.4f}, max {e.max():.3f}")
        flush = np.ones(60_000_000, np.float32)  # 240 MB
        for d, r in runners.items():
            state = r.run([0, 5, 6, 7, 8], r.empty_state())[1]
            times = []
            for _ in range(40):
                flush += 1.0
                start = time.perf_counter()
                r.run([9], state)
                times.append(time.perf_counter() - start)
            print(f"{d} graph: one cached step after a 240 MB pass {1000 * statistics.median(times):.2f} ms")


if __name__ == "__main__":
    main()
