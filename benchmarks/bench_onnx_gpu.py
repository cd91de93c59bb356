"""Fused vs unfused decoding on ONNX Runtime's CUDA execution provider: for a person with an NVIDIA GPU.

    pip install -e '.[onnx-gpu]'     # onnxruntime-gpu replaces onnxruntime (uninstall the CPU build first)
    python benchmarks/bench_onnx_gpu.py [--export DIR] [--calibrator ALIGNED_DIR] [--batch 1,8] [--tokens 64] [--reps 7]

Not run by the test suite (the project builds and tests without a GPU). It

1. checks that :func:`detox.adapters.onnxruntime.default_providers` picks CUDA and that the session really runs on it;
2. checks that strength 0 reproduces unfused CUDA greedy output, and measures the CUDA-vs-CPU logit gap;
3. times fused vs unfused greedy decoding (interleaved, median) at each batch size, with the calibrator on the CUDA
   provider (the default: the target's provider) and on the CPU provider, and prints ``fused/unfused time: X.XXx``
   for batch 1 with the default placement as the last line.

The export defaults to SmolLM2-135M (``~/.cache/detox/onnx/smollm2``, written by ``benchmarks/onnx_smollm2.py`` or
here if missing); the calibrator to the shipped SmolLM2 artifact, else the random stand-in of that script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_smollm2 import CACHE, PROMPTS, SHIPPED, build_standin, ensure_export  # noqa: E402


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, default=CACHE / "smollm2")
    ap.add_argument("--calibrator", default=None)
    ap.add_argument("--strength", type=float, default=None)
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    import detox
    from detox.adapters.onnxruntime import CPU, CUDA, calibrator_runner, default_providers, load_ort_target

    providers = default_providers()
    print(f"onnxruntime {ort.__version__}; available: {ort.get_available_providers()}; default: {providers}")
    if providers[0] != CUDA:
        sys.exit("no CUDA: install the GPU build (pip install 'detox[onnx-gpu]', after uninstalling onnxruntime) "
                 "on a machine with an NVIDIA GPU and driver")
    ensure_export(args.export)
    cal = args.calibrator or (str(SHIPPED) if (SHIPPED / "manifest.json").is_file() else str(build_standin(args.export)))
    print(f"calibrator: {cal}")

    model, tok = load_ort_target(args.export)  # auto: CUDA
    tok.padding_side = "left"
    print(f"target session providers: {model.providers}; device {model.device}; io binding {model.use_io_binding}")
    if model.providers[0] != CUDA:
        sys.exit(f"the session fell back to {model.providers}: check the CUDA/cuDNN libraries onnxruntime-gpu needs")
    fused = detox.wrap(model, calibrator=cal, tokenizer=tok, strength=args.strength)
    print(f"calibrator session providers: {fused.runner.session.get_providers()}; strength {fused.strength}")

    def gen(m, prompts, new):
        batch = tok(prompts, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            return m.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=tok.pad_token_id)

    zero = detox.wrap(model, calibrator=cal, tokenizer=tok, strength=0.0)
    same = torch.equal(gen(zero, PROMPTS, 20), gen(model, PROMPTS, 20))
    print(f"[{'ok' if same else 'FAIL'}] strength 0 reproduces unfused CUDA greedy (padded batch of {len(PROMPTS)})")
    cpu_model, _ = load_ort_target(args.export, "cpu")
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        gap = float((model(**batch.to(model.device)).logits.cpu() - cpu_model(**batch).logits).abs().max())
    print(f"       CUDA vs CPU unfused logits: max |difference| {gap:.2e}")
    del cpu_model

    placements = {"calibrator on CUDA": fused.runner, "calibrator on CPU": calibrator_runner(fused.calibrator, [CPU])}
    last = None
    for bs in [int(b) for b in args.batch.split(",")]:
        prompts = (PROMPTS * bs)[:bs]
        gen(model, prompts, 8)
        plain = timed(lambda: gen(model, prompts, args.tokens), args.reps)
        print(f"batch {bs}: unfused {bs * args.tokens / plain:8.1f} tok/s")
        for name, runner in placements.items():
            fused.__dict__["runner"] = runner
            gen(fused, prompts, 8)
            t = timed(lambda: gen(fused, prompts, args.tokens), args.reps)
            print(f"batch {bs}: fused   {bs * args.tokens / t:8.1f} tok/s ({name}): fused/unfused time {t / plain:.2f}x")
            if bs == 1 and name == "calibrator on CUDA":
                last = t / plain
    fused.__dict__["runner"] = placements["calibrator on CUDA"]
    if last is not None:
        print(f"fused/unfused time: {last:.2f}x")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
