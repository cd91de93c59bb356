"""Where a fused transformers decoding step spends its time, and why the calibrator costs more inside ``generate``.

    python benchmarks/fused_step_breakdown.py [--tokens 32] [--repetitions 5] [--threads 1]

Part 1 times greedy decoding of one SmolLM2 sequence unfused, fused with the shipped calibrator inline (the default),
and fused with the calibrator forced onto the worker thread (``overlap``, which a single sequence no longer uses on
transformers), interleaved; then the pieces of :class:`~detox.engine.FusionEngine` inline, on the calling thread
(wrapping the library's own methods, so the code timed is the code run). Times are wall clock and, in brackets,
the calling thread's CPU time, which a busy machine inflates less.
Part 2 times the calibrator pair's one-token step alone: back to back (warm caches), after a 5 ms sleep, and after
a pass over a 240 MB tensor, which evicts the caches as the target's forward pass (540 MB of float32 weights per
token) does. Needs only what ``make test`` installs; reads no network.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch

import detox
from detox.adapters.transformers import FusionLogitsProcessor
from detox.engine import Slot
from detox.fusion import CONTRAST
from detox.methods.contrast import ContrastHead
from detox.methods.interpolate import FusionHead
from detox.stream import PairRunner
from detox.targets import load_hf_target

PROMPT = "The city council met on Tuesday to discuss"


def _timed(owner: Any, name: str, totals: dict[str, float], key: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``totals[key]``."""
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def _mean_ms(fn: Callable[[], Any], before: Callable[[], Any], n: int) -> float:
    total = 0.0
    for _ in range(n):
        before()
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    return 1000 * total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (detox serve --threads; 1 leaves a core free)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_hf_target("smollm2")
    fused = detox.wrap(model, tokenizer=tokenizer)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    kwargs = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)

    def decode(m: Any) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.thread_time()
        with torch.inference_mode():
            m.generate(**inputs, **kwargs)
        return time.perf_counter() - start, time.thread_time() - cpu

    def forced_overlap() -> tuple[float, float]:
        fused.overlap, type(fused)._overlap_one_row = True, True
        try:
            return decode(fused)
        finally:
            fused.overlap, type(fused)._overlap_one_row = False, False

    runs: dict[str, list[tuple[float, float]]] = {"unfused": [], "fused, inline (default)": [],
                                                   "fused, overlap forced": []}
    decode(model), decode(fused), forced_overlap()  # warm-up
    for _ in range(args.repetitions):  # interleaved: the machine's load drifts
        runs["unfused"].append(decode(model))
        runs["fused, inline (default)"].append(decode(fused))
        runs["fused, overlap forced"].append(forced_overlap())
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    base = median([w for w, _ in runs["unfused"]]), median([c for _, c in runs["unfused"]])
    for name, times in runs.items():
        wall, cpu = median([w for w, _ in times]), median([c for _, c in times])
        print(f"{name:26s} step {1000 * wall / args.tokens:7.2f} ms ({wall / base[0]:.3f}x) "
              f"[cpu {1000 * cpu / args.tokens:6.2f} ms, {cpu / base[1]:.3f}x]  (median of {args.repetitions})")

    runner = fused.calibrator.default_runner()
    head_type = ContrastHead if fused.calibrator.fusion_mode == CONTRAST else FusionHead
    parts = [(FusionLogitsProcessor, "__call__", "whole processor"),
             (Slot, "output", "  detokenize + calibrator"),
             (type(runner), "run", "    calibrator step" + (" (pair graph, log-ratio included)" if getattr(
                 runner, "gives_log_ratio", False) else " (both models)" if isinstance(runner, PairRunner) else "")),
             (head_type, "prepare", "  prepare (log-softmaxes, torch)"),
             (head_type, "apply", "  apply (candidates, fuse)")]
    totals = {key: 0.0 for _, _, key in parts}
    for owner, name, key in parts:
        _timed(owner, name, totals, key)
    for _ in range(args.repetitions):
        decode(fused)
    steps = args.tokens * args.repetitions
    print("inline, per step (wall):")
    for key, seconds in totals.items():
        print(f"  {key:32s} {1000 * seconds / steps:6.3f} ms per step")

    cal = fused.calibrator
    stream = cal.stream()
    stream.hidden_for(" " + PROMPT + " the")
    state, token = stream.state, cal.tokenizer.encode(" budget", add_special_tokens=False).ids[:1]
    big = torch.ones(60_000_000)
    step = lambda: runner.run(token, state)  # noqa: E731
    print("calibrator step alone:")
    print(f"  back to back               {_mean_ms(step, lambda: None, 200):.3f} ms")
    print(f"  after a 5 ms sleep         {_mean_ms(step, lambda: time.sleep(0.005), 100):.3f} ms")
    print(f"  after reading 240 MB       {_mean_ms(step, big.sum, 100):.3f} ms")


if __name__ == "__main__":
    main()
