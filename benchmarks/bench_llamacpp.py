"""Tokens/s of llama.cpp greedy decoding with and without the fused calibrator, measured in one run.

    python benchmarks/bench_llamacpp.py [--calibrator ALIGNED_DIR] [--target FILE.gguf] [--tokens 64] [--reps 7]

Fused and unfused runs alternate (so background load hits both alike) after a warm-up of each; every run
decodes exactly ``--tokens`` greedy tokens from a cleared KV cache; the report is the median time per token. The last
line is ``fused/unfused time: X.XXx``.

The calibrator defaults to the shipped one aligned to SmolLM2 (``artifacts/shipped/smollm2-135m-instruct``). If
it is absent, a *stand-in* is built once (cached in ``~/.cache/detox/bench``): the default calibrator
architecture (d_cal 192, 4 layers, its own 8k BPE vocabulary) with random weights and a random alignment bound
to the target's fingerprint. Per-step cost depends only on these shapes, not on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "artifacts" / "shipped" / "smollm2-135m-instruct"
PROMPTS = ["The weather today is", "My favourite recipe for a quick dinner", "In the year 1850, the town of"]


def build_standin(gguf: str, cache_dir: Path) -> Path:
    """A random calibrator of the default shape, aligned (randomly) to ``gguf``'s fingerprint; needs torch."""
    from detox.adapters.llamacpp import gguf_fingerprint
    from standin import build_standin as build

    return build(gguf_fingerprint(gguf), cache_dir)


def timed_run(llm, prompt: str, tokens: int) -> tuple[float, float]:
    """Wall and process-CPU seconds per token of exactly ``tokens`` greedy steps from a cleared cache.

    Uses ``generate`` (the decoding loop under ``create_completion``, which never stops at end-of-text) so both
    runs decode the same number of tokens and no extra processor (e.g. an EOS ban) is added to the baseline.
    """
    llm.reset()
    ids = llm.tokenize(prompt.encode(), add_bos=False)
    t0, c0 = time.perf_counter(), time.process_time()
    for n, _ in enumerate(llm.generate(ids, temp=0.0), start=1):
        if n == tokens:
            break
    return (time.perf_counter() - t0) / tokens, (time.process_time() - c0) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2", help="GGUF file (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--calibrator", default=None, help="aligned artifact (default: shipped SmolLM2 one, else a stand-in)")
    ap.add_argument("--strength", type=float, default=0.3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-overlap", action="store_true",
                    help="compute the fusion inside the logits processor instead of during llama.cpp's decode")
    ap.add_argument("--compare-inline", action="store_true",
                    help="also time the fusion computed inline (overlap off), interleaved in the same run")
    ap.add_argument("--extra-buffers", choices=["on", "off"], default=None,
                    help="llama.cpp weight repacking (default: off unless DETOX_LLAMACPP_EXTRA_BUFFERS=1)")
    args = ap.parse_args()

    import detox
    from detox.adapters.llamacpp import load_llama
    from detox.targets import resolve_target

    gguf = resolve_target(args.target)
    cal = args.calibrator
    if cal is None:
        cal = SHIPPED if (SHIPPED / "manifest.json").is_file() else None
    if cal is None:
        cal = build_standin(gguf, Path.home() / ".cache" / "detox" / "bench")
        print(f"calibrator: stand-in {cal} (no shipped artifact; timing depends only on shapes)")
    else:
        print(f"calibrator: {cal}")
    extra = None if args.extra_buffers is None else args.extra_buffers == "on"
    llm = load_llama(gguf, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, seed=0, extra_buffers=extra)
    fused = detox.wrap(llm, calibrator=str(cal), strength=args.strength)
    fused.overlap = not args.no_overlap
    m = fused.calibrator.manifest.calibrator
    print(f"target: {Path(gguf).name}, vocab {fused.head.vocab_size}; calibrator d={m.hidden_size} layers={m.num_layers};"
          f" strength {args.strength}; {args.tokens} tokens x {args.reps} reps x {len(PROMPTS)} prompts;"
          f" threads {args.threads}; overlap {fused.overlap}; cpus {os.cpu_count()}")

    runners = {"unfused": llm, "fused": fused}
    if args.compare_inline and fused.overlap:
        inline = detox.wrap(llm, calibrator=str(cal), strength=args.strength)
        inline.overlap = False
        runners["fused-inline"] = inline
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for name in runners:  # warm-up: page in weights, build caches
        timed_run(runners[name], PROMPTS[0], 8)
    for rep in range(args.reps):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for prompt in PROMPTS:
            for name in order:
                wall, used = timed_run(runners[name], prompt, args.tokens)
                times[name].append(wall)
                cpu[name].append(used)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in runners:
        print(f"{name:>12}: {1 / med[name]:7.1f} tok/s (median of {len(times[name])} runs, {1000 * med[name]:.2f} ms/token;"
              f" CPU {1000 * statistics.median(cpu[name]):.2f} ms/token)")
    if "fused-inline" in med:
        print(f"fused-inline/unfused time: {med['fused-inline'] / med['unfused']:.2f}x")
    print(f"fused/unfused CPU time: {statistics.median(cpu['fused']) / statistics.median(cpu['unfused']):.2f}x")
    print(f"fused/unfused time: {med['fused'] / med['unfused']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
