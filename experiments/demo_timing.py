"""Why can a fused ``detox demo`` batch be many times slower than the plain one? Times each part on its own.

In one fresh process: import/creation of the calibrator's ONNX Runtime session (the shipped artifact runs its
calibrator graph with ONNX Runtime; the session is made lazily, on the first fused step), the first fused
``generate`` (pays that), then ``--repeats`` alternating plain/fused batches after a warm-up, for each torch
thread count in ``--torch-threads``.

    python experiments/demo_timing.py --repeats 3 --torch-threads 2 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--samples", type=int, default=5, help="sampled continuations per prompt (the demo's)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args()
    import torch

    import detox
    from detox.cli.demo import demo_prompts
    from detox.targets import load_hf_target

    texts = [p["text"] for p in demo_prompts()]
    model, tok = load_hf_target("smollm2")
    tok.padding_side = "left"
    fused = detox.wrap(model, tokenizer=tok)
    batch = tok(texts, return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=True, top_p=0.9, top_k=0,
               num_return_sequences=args.samples, pad_token_id=tok.pad_token_id)

    def run(runner) -> float:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            runner.generate(**batch, **gen)
        return time.perf_counter() - t0

    out: dict = {"prompts": len(texts), "samples": args.samples, "max_new_tokens": args.max_new_tokens}
    t0 = time.perf_counter()
    fused.calibrator.default_runner()
    out["calibrator_session_s"] = time.perf_counter() - t0
    out["first_plain_s"] = run(model)
    out["first_fused_s"] = run(fused)
    for n in args.torch_threads:
        torch.set_num_threads(n)
        run(model), run(fused)  # warm-up at this thread count
        plain, fz = [], []
        for _ in range(args.repeats):
            plain.append(run(model))
            fz.append(run(fused))
        out[f"torch_threads_{n}"] = {"plain_s": plain, "fused_s": fz, "median_plain_s": statistics.median(plain),
                                     "median_fused_s": statistics.median(fz)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
