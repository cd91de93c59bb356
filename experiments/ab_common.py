"""What the decoding A/B scripts in this folder share: their command line and their report."""

from __future__ import annotations

import argparse
from pathlib import Path

from detox.bench import format_arms


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


def report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    print(f"backend {args.backend}, {args.tokens} tokens, {args.repetitions} repetitions (median)")
    print(format_arms(times, args.tokens))
