"""What the decoding A/B scripts in this folder share: their command line and their report."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def ab_parser(doc: str) -> argparse.ArgumentParser:
    """``--backend --target --tokens --repetitions --prompt``; add script-specific options to the result."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--backend", choices=["hf", "onnx", "llamacpp"], default="hf")
    ap.add_argument("--target", default=None, help="default: smollm2 (hf, llamacpp) or ~/.cache/detox/onnx/smollm2 (onnx)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--prompt", default="The city council met on Tuesday to discuss")
    return ap


def target_of(args: argparse.Namespace) -> str:
    return args.target or (str(Path.home() / ".cache/detox/onnx/smollm2") if args.backend == "onnx" else "smollm2")


def format_arms(times: dict[str, list[float]], tokens: int, baseline: str = "unfused") -> str:
    """One line per arm: tokens/s, ms per token and time relative to ``baseline`` (medians)."""
    base = statistics.median(times[baseline])
    width = max(len(name) for name in times) + 2
    lines = []
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"{name:{width}s} {tokens / med:6.2f} tok/s   {1000 * med / tokens:6.2f} ms/token   {med / base:.3f}x")
    return "\n".join(lines)


def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    print(f"backend {args.backend}, {args.tokens} tokens, {args.repetitions} repetitions (median)")
    print(format_arms(times, args.tokens))
