"""A/B of how the contrast pair runs inside real decoding, all arms interleaved in one process (medians printed):

* unfused;
* "two graphs": the expert and the anti-expert as two ONNX Runtime sessions, their log-softmaxes in torch — how
  3.0.1 ran (the same weights; its graphs are re-exported here as two single-model graphs of the current layout);
* "pair graph": the artifact's ``calibrator.onnx`` as shipped since 3.0.2, both models as one batch and the
  log-ratio computed in the graph;
* transformers only, "..., inline": the same without overlapping the calibrator with the target's forward pass.

    python experiments/pair_graph_ab.py --backend hf|onnx|llamacpp [--tokens 32] [--repetitions 5]

Greedy decoding of a fixed number of tokens; on transformers the fused arms must produce the same tokens (checked).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from ab_common import ab_parser, report, target_of
from detox.artifacts.shipped import find_shipped_for
from detox.bench import time_arms
from detox.cli.bench import runners_for
from detox.onnx_calibrator import OnnxRunner, export_calibrator_onnx
from detox.runtime import Calibrator
from detox.stream import PairRunner


def two_graph_calibrator(path: Path, tmp: Path) -> Calibrator:
    """The artifact at ``path``, loaded so that every backend runs it as two sessions plus the torch log-softmaxes."""
    cal = Calibrator.load(path)
    pair = PairRunner(OnnxRunner(export_calibrator_onnx(cal.torch_model(), tmp / "expert.onnx")),
                      OnnxRunner(export_calibrator_onnx(cal.torch_model("anti"), tmp / "anti.onnx")))
    cal._onnx_runner = cal._runner = pair  # what onnx_runner() / default_runner() return from now on
    return cal


def hf_arms(model: Any, tokenizer: Any, shipped: Calibrator, old: Calibrator, tokens: int,
            prompt: str) -> dict[str, Callable[[], list[int]]]:
    import torch

    import detox

    inputs = tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def arm(m) -> Callable[[], list[int]]:
        def run() -> list[int]:
            with torch.inference_mode():
                return m.generate(**inputs, **kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
        return run

    def wrapped(calibrator: Calibrator, overlap: bool) -> Callable[[], list[int]]:
        fused = detox.wrap(model, calibrator=calibrator, tokenizer=tokenizer)
        fused.overlap = overlap
        return arm(fused)

    return {"unfused": arm(model), "two graphs, inline": wrapped(old, False), "two graphs": wrapped(old, True),
            "pair graph, inline": wrapped(shipped, False), "pair graph": wrapped(shipped, True)}


def main() -> None:
    ap = ab_parser(__doc__)
    args = ap.parse_args()
    target = target_of(args)

    with tempfile.TemporaryDirectory() as tmp:
        if args.backend == "hf":
            from detox.fingerprint import fingerprint_hf
            from detox.targets import load_hf_target

            model, tokenizer = load_hf_target(target)  # loaded once: it serves every arm
            shipped_path = find_shipped_for(fingerprint_hf(model, tokenizer))
            shipped, old = Calibrator.load(shipped_path), two_graph_calibrator(shipped_path, Path(tmp))
            arms = hf_arms(model, tokenizer, shipped, old, args.tokens, args.prompt)
        else:
            plain, fused_new, shipped, _ = runners_for(args.backend, target, None, None, args.tokens, args.prompt, "cpu")
            old = two_graph_calibrator(shipped.path, Path(tmp))  # the shipped artifact, matched by fingerprint above
            _, fused_old, _, _ = runners_for(args.backend, target, old, None, args.tokens, args.prompt, "cpu")
            arms = {"unfused": plain, "two graphs": fused_old, "pair graph": fused_new}
        print(f"calibrator: {shipped.manifest.name}@{shipped.manifest.version}")
        outputs = {name: fn() for name, fn in arms.items()}  # warm-up
        fused = {name: out for name, out in outputs.items() if name != "unfused" and isinstance(out, list)}
        if len({tuple(out) for out in fused.values()}) > 1:
            raise RuntimeError(f"the fused arms generated different tokens: {fused}")
        report(args, time_arms(arms, args.repetitions))


if __name__ == "__main__":
    main()
